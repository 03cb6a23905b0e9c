"""Sample sources: tar shards (webdataset layout, any fsspec URL) and the official ImageFolder tree.

A source knows how many samples it holds and can read any contiguous range of
positions of an epoch's sample order.  The epoch order is a pure function of
(seed, epoch): shards are shuffled as a whole for tar shards (samples are then
shuffled inside a worker's stream by the shuffle buffer), and samples are
shuffled individually for ImageFolder, like DistributedSampler.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import braceexpand
import torch
from webdataset.tariterators import group_by_keys

from ..errors import UserError
from .remote import (LOCAL_PROTOCOLS, DataUnavailable, ReadPolicy, error_text, filesystem, is_transient, open_stream,
                     protocol_of, unavailable, with_retries)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MID_RUN_FIX = ("restore access to the storage and resume from the last checkpoint, or raise data.read_attempts / "
               "data.retry_backoff_s to wait longer")
STARTUP_FIX = "check data.shards (host, port, path) and that the storage answers"
FOLDER_IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTENSIONS)


@dataclass
class RawSample:
    key: str
    data: bytes
    label: int
    source: str


@dataclass
class ReadError:
    """A sample that could not be read (corrupt member, truncated or unreadable shard)."""

    source: str
    message: str


def _fingerprint(items) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode() + b"\n")
    return digest.hexdigest()[:16]


def _epoch_generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + epoch * 7_919 + salt) % (2**63))
    return gen


class ShardSource:
    """Tar shards listed with their sample counts.

    Epoch order: the shard list permuted by (seed, epoch); positions index the
    concatenation of the permuted shards.
    """

    shuffle_in_stream = True

    def __init__(self, urls: Sequence[str], counts: Sequence[int], damaged: Sequence["ShardDamage"] = (),
                 policy: Optional[ReadPolicy] = None):
        if len(urls) != len(counts):
            raise ValueError("urls and counts must have the same length")
        self.urls = list(urls)
        self.counts = [int(c) for c in counts]
        self.num_samples = sum(self.counts)
        self.damaged = list(damaged)
        self.policy = policy or ReadPolicy()

    @property
    def startup_skipped(self) -> int:
        """Samples known lost before training: one per damaged unindexed shard (the sample the
        reading stopped in; how many followed it is unknown without an index)."""
        return len(self.damaged)

    def describe(self) -> str:
        return f"{len(self.urls)} shards, {self.num_samples} samples"

    def fingerprint(self) -> str:
        return _fingerprint(posixpath.basename(u) + f":{c}" for u, c in zip(self.urls, self.counts))

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        return torch.randperm(len(self.urls), generator=_epoch_generator(seed, epoch, 1)).tolist()

    def read_range(self, seed: int, epoch: int, start: int, stop: int) -> Iterator[RawSample | ReadError]:
        """Yield exactly `stop - start` items for positions start..stop-1 of the epoch order."""
        base = 0
        for shard in self.epoch_order(seed, epoch):
            count = self.counts[shard]
            lo, hi = max(start, base), min(stop, base + count)
            if lo < hi:
                yield from self._read_shard(self.urls[shard], lo - base, hi - base, count)
            base += count
            if base >= stop:
                break

    def _read_shard(self, url: str, first: int, stop: int, count: int) -> Iterator[RawSample | ReadError]:
        """Samples first..stop-1 of one shard of `count` samples.

        A failure to reach the shard (a refused or dropped connection, a timeout, a 5xx answer, or a
        404: the shard was there at start-up, so the server is restarting) reopens it and skips what
        was delivered, with exponential backoff; after `policy.attempts` failures in a row the run
        stops with DataUnavailable. Damage ends the shard early: the samples after it are ReadErrors.
        """
        policy = self.policy
        index = 0  # samples of the shard passed so far
        failures = 0
        failing_since = 0.0
        while index < stop:
            progress = index
            try:
                with open_stream(url, policy) as stream:
                    for n, sample in enumerate(iter_tar_samples(stream, url)):
                        if n < index:
                            continue  # delivered before a transient error
                        if index >= first:
                            yield _decode_member(sample, url)
                        index += 1
                        if index >= stop:
                            break  # without reading on: the rest may be damaged or not ours
                break
            except Exception as exc:
                if not (is_transient(exc) or isinstance(exc, FileNotFoundError)):
                    message = f"shard ended after {index} samples ({error_text(exc)})"
                    yield from self._missing(url, index, first, stop, message)
                    return
                if failures == 0 or index > progress:
                    failures, failing_since = 0, time.monotonic()
                failures += 1
                if failures >= policy.attempts:
                    raise unavailable(url, policy, failures, time.monotonic() - failing_since, exc,
                                      MID_RUN_FIX) from exc
                delay = policy.delay(failures)
                logger.warning("reading %s failed after %d samples (%s); retry %d/%d in %.1f s", url, index,
                               error_text(exc), failures, policy.attempts - 1, delay)
                time.sleep(delay)
        # A shard shorter than its index says: the missing samples are counted as errors.
        for _ in range(stop - max(index, first)):
            yield ReadError(url, f"shard has {index} samples, its index says {count}")

    @staticmethod
    def _missing(url: str, index: int, first: int, stop: int, message: str) -> Iterator[ReadError]:
        for _ in range(stop - max(index, first)):
            yield ReadError(url, message)


def _tar_members(stream, url: str) -> Iterator[dict]:
    """Regular-file members of a tar stream, as webdataset's grouping expects them.

    Python's tarfile ends a stream silently when it is cut inside a member header, so the
    end-of-archive marker (a zero block after the last member) is checked here: a shard cut at
    any byte raises ReadError instead of passing for a shorter complete one.
    """
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if info.isreg() and not info.name.startswith("__"):
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
        tar.members = []  # stream mode: do not keep every header of a large shard
    if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"unexpected end of data after byte {tar.fileobj.pos} (the tar has no "
                                f"end-of-archive marker: truncated)")


def _members(sample: dict) -> frozenset:
    return frozenset(k for k in sample if not k.startswith("__"))


def iter_tar_samples(stream, url: str) -> Iterator[dict]:
    """Samples of one tar stream, members grouped by key (webdataset's grouping).

    A stream that breaks off still yields the sample it was in when that sample is complete:
    it has the members of the shard's first sample (an image, for the first one)."""
    failure = []

    def members():
        try:
            yield from _tar_members(stream, url)
        except Exception as exc:  # raised below, after the last complete sample
            failure.append(exc)

    layout = None
    for sample in group_by_keys(members()):
        if failure:
            complete = _members(sample) >= layout if layout else any(e in sample for e in IMAGE_EXTENSIONS)
            if not complete:
                break
        layout = layout or _members(sample)
        yield sample
    if failure:
        raise failure[0]


def _decode_member(sample: dict, url: str) -> RawSample | ReadError:
    key = sample.get("__key__", "?")
    data = None
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            data = sample[ext]
            break
    if data is None:
        return ReadError(url, f"sample {key!r} has no image member (.jpg/.png/.webp)")
    label = -1
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            return ReadError(url, f"sample {key!r} has an unreadable .cls member")
    return RawSample(key=key, data=data, label=label, source=url)


def _no_folder(root: str) -> str:
    return (f"ImageFolder root {root!r} does not exist: set data.root_path and data.image_folder "
            f"(expects <root_path>/<image_folder>/train/<class>/<image>) or use data.shards")


class ImageFolderSource:
    """The official layout: root/<class>/<image>, classes sorted by name."""

    shuffle_in_stream = False

    def __init__(self, root: str):
        fs, path = filesystem(root)
        if not fs.isdir(path):
            raise FileNotFoundError(_no_folder(root))
        self.fs = fs
        classes = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p))
        if not classes:
            raise FileNotFoundError(f"ImageFolder root {root!r} has no class sub-directories")
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = sorted(
                p for p in fs.find(posixpath.join(path, name)) if p.lower().endswith(FOLDER_IMAGE_SUFFIXES)
            )
            files.extend(found)
            labels.extend([label] * len(found))
        if not files:
            raise FileNotFoundError(f"ImageFolder root {root!r} holds no .jpg/.jpeg/.png/.webp images")
        self.root = root
        self.classes = classes
        self.files = files
        self.labels = labels
        self.num_samples = len(files)

    def describe(self) -> str:
        return f"ImageFolder {self.root}: {len(self.classes)} classes, {self.num_samples} images"

    def fingerprint(self) -> str:
        root = self.fs._strip_protocol(posixpath.join(self.root, ""))
        return _fingerprint(f[len(root):] if f.startswith(root) else f for f in self.files)

    def read_range(self, seed: int, epoch: int, start: int, stop: int) -> Iterator[RawSample | ReadError]:
        order = torch.randperm(self.num_samples, generator=_epoch_generator(seed, epoch, 2))
        for index in order[start:stop].tolist():
            path = self.files[index]
            try:
                with self.fs.open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                yield ReadError(path, f"{type(exc).__name__}: {exc}")
                continue
            yield RawSample(key=path, data=data, label=self.labels[index], source=path)


def expand_urls(pattern: str) -> list[str]:
    urls: list[str] = []
    for part in pattern.split("::"):
        urls.extend(braceexpand.braceexpand(part.strip()))
    return [u for u in urls if u]


def index_candidates(urls: list[str]) -> list[str]:
    first = urls[0]
    directory = posixpath.dirname(first)
    name = posixpath.basename(first)
    stem = name.rsplit("-", 1)[0] if "-" in name else name.rsplit(".", 1)[0]
    return [posixpath.join(directory, f"{stem}-index.json"), posixpath.join(directory, "index.json")]


def read_json(url: str, policy: Optional[ReadPolicy] = None) -> Optional[dict]:
    policy = policy or ReadPolicy()
    fs, path = filesystem(url, policy)
    if not _exists(fs, path, url, policy):
        return None

    def read():
        with open_stream(url, policy) as f:
            return f.read()

    text = with_retries(url, policy, "reading index", read, STARTUP_FIX)
    try:
        index = json.loads(text)
        if not isinstance(index, dict) or not all(
                isinstance(e, dict) and "url" in e and "num_samples" in e for e in index.get("shards", [])):
            raise ValueError("expected {\"shards\": [{\"url\": ..., \"num_samples\": ...}, ...]}")
    except ValueError as exc:
        raise UserError(f"shard index {url} is not a valid index ({exc}); rewrite it with "
                        f"`ijepa-scale make-shards`, or delete it to have the shards counted") from None
    return index


def _index_entries(index: dict, directory: str) -> dict[str, dict]:
    """url -> entry for the shards an index lists (their urls are relative to its folder)."""
    return {posixpath.join(directory, posixpath.basename(entry["url"])): entry for entry in index.get("shards", [])}


@dataclass
class ShardDamage:
    """An unindexed shard that could not be read to its end while counting its samples."""

    url: str
    readable: int  # whole samples before the damage; only these are trained on
    error: str

    def what(self) -> str:
        if self.readable == 0:
            return f"shard {self.url} is unreadable ({self.error})"
        return f"shard {self.url} is damaged after {self.readable} samples ({self.error})"

    def describe(self) -> str:
        if self.readable == 0:
            return f"{self.what()}; it is skipped"
        return f"{self.what()}; its first {self.readable} samples are used and the rest is skipped"


def scan_shard(url: str, policy: Optional[ReadPolicy] = None) -> tuple[int, Optional[str]]:
    """(whole samples readable from the start of the shard, the error that ended reading early or None).

    Transient errors are retried; storage that keeps failing is DataUnavailable."""
    policy = policy or ReadPolicy()

    def attempt():
        count = 0
        try:
            with open_stream(url, policy) as stream:
                for _ in iter_tar_samples(stream, url):
                    count += 1
        except Exception as exc:  # truncated, zero-byte, a directory, unreadable: whatever stops the read
            if is_transient(exc):
                raise
            return count, error_text(exc)
        return count, None

    return with_retries(url, policy, "counting", attempt, STARTUP_FIX)


def _exists(fs, path: str, url: str, policy: ReadPolicy) -> bool:
    """Whether `url` exists; an unreachable storage is retried, then DataUnavailable naming the real
    cause (fsspec's exists() answers False for a refused connection)."""
    def attempt():
        try:
            fs.info(path)
        except FileNotFoundError as exc:
            if is_transient(exc):
                raise
            return False
        return True

    return with_retries(url, policy, "checking", attempt, STARTUP_FIX)


def _list_shards(urls: list[str], policy: ReadPolicy) -> tuple[list[str], dict[str, Optional[int]]]:
    """(URLs that do not exist, url -> size in bytes where a listing gives it); one directory
    listing per directory instead of a request per shard."""
    listed: dict[str, dict] = {}
    missing = []
    sizes: dict[str, Optional[int]] = {}
    for url in urls:
        fs, path = filesystem(url, policy)
        directory = posixpath.dirname(path)
        if directory not in listed:
            try:
                listed[directory] = {e["name"].rstrip("/"): e for e in fs.ls(directory, detail=True)}
            except Exception:  # no listing (some HTTP servers) or no directory: ask per file below
                listed[directory] = {}
        entry = listed[directory].get(path)
        if entry is not None:
            sizes[url] = entry.get("size") if entry.get("type", "file") == "file" else None
            continue
        try:
            if not _exists(fs, path, url, policy):
                missing.append(url)
        except (DataUnavailable, UserError):
            raise
        except Exception as exc:
            raise FileNotFoundError(f"cannot access shard {url}: {error_text(exc)}") from exc
    return missing, sizes


def open_shards(pattern: str, index_url: Optional[str] = None, on_error: str = "skip",
                policy: Optional[ReadPolicy] = None) -> ShardSource:
    """Expand `pattern`, check every shard exists and find each shard's sample count.

    Counts come from the index written by make_shards; shards it does not list are
    scanned once (slow for remote storage, so a warning says so). An unindexed shard that
    cannot be read to its end counts the samples before the damage and is reported once
    (`on_error="skip"`), or stops the run with one line naming it (`on_error="fail"`).
    """
    urls = expand_urls(pattern)
    if not urls:
        raise UserError(f"data.shards={pattern!r} expands to no URL")
    policy = policy or ReadPolicy()
    missing, sizes = _list_shards(urls, policy)
    _check_missing(pattern, urls, missing)

    entries: dict[str, dict] = {}
    if index_url is not None:
        index = read_json(index_url, policy)
        if index is None:
            raise FileNotFoundError(f"data.shards_index {index_url!r} does not exist")
        # An index given explicitly may live elsewhere: match its shards by file name.
        by_name = {posixpath.basename(e["url"]): e for e in index.get("shards", [])}
        entries.update({u: by_name[posixpath.basename(u)] for u in urls if posixpath.basename(u) in by_name})
    else:
        for directory in dict.fromkeys(posixpath.dirname(u) for u in urls):
            first = next(u for u in urls if posixpath.dirname(u) == directory)
            for candidate in index_candidates([first]):
                index = read_json(candidate, policy)
                if index is not None:
                    entries.update(_index_entries(index, directory))
                    break
    known = {u: int(e["num_samples"]) for u, e in entries.items() if u in set(urls)}
    # The index records each shard's size: a shard changed or cut since it was indexed shows here.
    changed = [(u, sizes[u], entries[u]["bytes"]) for u in urls
               if u in entries and "bytes" in entries[u] and sizes.get(u) is not None
               and int(sizes[u]) != int(entries[u]["bytes"])]
    for url, size, expected in changed:
        message = f"shard {url} has {size} bytes, its index says {expected}: it changed since it was indexed"
        if on_error == "fail":
            raise UserError(f"{message}; restore it or rewrite the index with `ijepa-scale make-shards`, or set "
                            f"data.on_error=skip to skip what cannot be read")
        logger.warning("%s; what cannot be read is skipped and counted", message)
    counts = []
    unindexed = [u for u in urls if u not in known]
    started = time.monotonic()
    damaged = []
    for url in urls:
        if url in known:
            counts.append(known[url])
            continue
        count, error = scan_shard(url, policy)
        counts.append(count)
        if error is not None:
            damage = ShardDamage(url, count, error)
            if on_error == "fail":
                raise UserError(f"{damage.what()}; replace the shard, drop it from "
                                f"data.shards, or set data.on_error=skip to train without its damaged part")
            logger.warning("%s (counted as 1 skipped sample)", damage.describe())
            damaged.append(damage)
    if unindexed:
        logger.warning("%d of %d shards are not in a shard index: their samples were counted by reading them "
                       "(%.1f s); write an index with `ijepa-scale make-shards` to skip this", len(unindexed),
                       len(urls), time.monotonic() - started)
    return ShardSource(urls, counts, damaged, policy)


def _check_missing(pattern: str, urls: list[str], missing: list[str]) -> None:
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}; check data.shards={pattern!r}, which expands "
                                f"to {len(urls)} shard(s)")


def check_local_data(data_cfg) -> None:
    """The checks of build_source that need local paths only, for the launcher to run before the
    ranks start: a wrong path is reported at once instead of after the ranks' start-up."""
    if data_cfg.shards:
        urls = expand_urls(data_cfg.shards)
        if urls and all(protocol_of(u) in LOCAL_PROTOCOLS for u in urls):
            _check_missing(data_cfg.shards, urls, _list_shards(urls, ReadPolicy.from_config(data_cfg))[0])
        return
    root = posixpath.join(data_cfg.root_path, data_cfg.image_folder, "train")
    if protocol_of(root) in LOCAL_PROTOCOLS:
        fs, path = filesystem(root)
        if not fs.isdir(path):
            raise FileNotFoundError(_no_folder(root))


def build_source(data_cfg) -> ShardSource | ImageFolderSource:
    if data_cfg.shards:
        return open_shards(data_cfg.shards, data_cfg.shards_index, on_error=data_cfg.on_error,
                           policy=ReadPolicy.from_config(data_cfg))
    root = posixpath.join(data_cfg.root_path, data_cfg.image_folder, "train")
    return ImageFolderSource(root)
