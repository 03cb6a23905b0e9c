"""What make-shards converts: an ImageFolder tree, a folder of per-synset tars (as ImageNet-22K ships) or a
`path<TAB>label` file list, listed as classes and samples, and the bytes of one sample."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .shard_format import DatasetError

# File suffixes picked up from the source tree (case-insensitive).
SOURCE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")

SRC_FORMATS = ("folder", "synset-tars", "list")


@dataclass(frozen=True)
class SourceSample:
    rel_path: str  # POSIX path relative to the source root (for a synset tar: "<tar name>/<member>")
    cls: int
    size: int = 0  # bytes of the source file, when known (plans shards by bytes)
    tar: str | None = None  # synset tars: the tar holding the member, and where its data starts
    offset: int = 0


def list_image_folder(src_root: str | os.PathLike) -> tuple[list[str], list[SourceSample]]:
    """Classes (sorted subdirectory names) and all image files below each, sorted."""
    root = Path(src_root)
    if not root.is_dir():
        raise DatasetError(f"source directory does not exist: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class subdirectories in {root} (expected {root}/<class>/*.jpg)")
    samples: list[SourceSample] = []
    empty: list[str] = []
    for cls, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            found.extend(
                (f"{rel_dir}/{fn}", _file_size(os.path.join(dirpath, fn)))
                for fn in filenames
                if not fn.startswith(".") and fn.lower().endswith(SOURCE_SUFFIXES)
            )
        if not found:
            empty.append(str(root / name))
        samples.extend(SourceSample(p, cls, size) for p, size in sorted(found))
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(f"{len(empty)} class directories contain no images: {shown}")
    return classes, samples


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def list_synset_tars(src_dir: str | os.PathLike,
                     num_workers: int = 1) -> tuple[list[str], list[SourceSample], list[dict]]:
    """IN-22K layout: a folder of `<synset>.tar`, each holding that synset's images.

    Classes are the sorted tar names without `.tar`. Returns (classes, samples, problems):
    a tar that cannot be listed to its end keeps the members before the damage and is
    reported; its class stays in the class list (possibly empty).
    """
    root = Path(src_dir)
    if not root.is_dir():
        raise DatasetError(f"source directory does not exist: {root}")
    tars = sorted(e.name for e in os.scandir(root) if e.name.endswith(".tar") and not e.name.startswith("."))
    if not tars:
        raise DatasetError(f"no <synset>.tar files in {root} (expected e.g. {root}/n01440764.tar)")
    classes = [name[: -len(".tar")] for name in tars]
    samples: list[SourceSample] = []
    problems: list[dict] = []
    listings = _map(_list_tar, [str(root / name) for name in tars], num_workers)
    for cls, (name, (members, error)) in enumerate(zip(tars, listings)):
        samples.extend(SourceSample(f"{name}/{m}", cls, size, str(root / name), offset) for m, offset, size in members)
        if error is not None:
            problems.append({"path": name, "error": f"synset tar listed to member {len(members)} only: {error}"})
    return classes, samples, problems


def _list_tar(path: str) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of the image members of a tar, and the error that ended the listing early."""
    members = []
    try:
        file_size = os.stat(path).st_size
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.isreg() and info.name.lower().endswith(SOURCE_SUFFIXES):
                    if info.offset_data + info.size > file_size:
                        raise tarfile.ReadError(f"{info.name} ends past the end of the file (truncated)")
                    members.append((info.name, info.offset_data, info.size))
                tar.members = []
            if tar.offset > file_size:
                raise tarfile.ReadError("truncated")
    except (OSError, tarfile.TarError) as exc:
        return members, f"{type(exc).__name__}: {exc}"
    return members, None


def list_file_list(list_file: str | os.PathLike) -> tuple[list[str], list[SourceSample]]:
    """`path<TAB>label` lines (relative paths are relative to the list's folder).

    Integer labels are class indices (classes "0".."max"); other labels are class names,
    indexed in sorted order."""
    path = Path(list_file)
    if not path.is_file():
        raise DatasetError(f"file list does not exist: {path}")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise DatasetError(f"{path}:{number}: expected 'path<TAB>label', got {line[:80]!r}")
        file, label = line.rsplit("\t", 1)
        entries.append((file.strip(), label.strip()))
    if not entries:
        raise DatasetError(f"file list {path} has no 'path<TAB>label' lines")
    labels = [label for _, label in entries]
    if all(label.isdigit() for label in labels):
        classes = [str(i) for i in range(max(int(label) for label in labels) + 1)]
        index = {c: i for i, c in enumerate(classes)}
    else:
        classes = sorted(set(labels))
        index = {c: i for i, c in enumerate(classes)}
    base = path.parent
    samples = [SourceSample(file, index[str(int(label)) if label.isdigit() else label],
                            _file_size(os.path.join(base, file))) for file, label in entries]
    return classes, samples


def list_source(src: str | os.PathLike, src_format: str, num_workers: int = 1):
    """(src_root, classes, samples, problems) for one of SRC_FORMATS."""
    if src_format == "folder":
        classes, samples = list_image_folder(src)
        return os.fspath(src), classes, samples, []
    if src_format == "synset-tars":
        classes, samples, problems = list_synset_tars(src, num_workers)
        return os.fspath(src), classes, samples, problems
    if src_format == "list":
        classes, samples = list_file_list(src)
        return os.fspath(Path(src).parent), classes, samples, []
    raise DatasetError(f"--src-format {src_format!r}: use one of {', '.join(SRC_FORMATS)}")


def read_source(src_root: str, sample: SourceSample) -> bytes:
    if sample.tar is None:
        with open(os.path.join(src_root, sample.rel_path), "rb") as f:
            return f.read()
    with open(sample.tar, "rb") as f:
        f.seek(sample.offset)
        data = f.read(sample.size)
    if len(data) != sample.size:
        raise OSError(f"truncated synset tar: {len(data)} of {sample.size} bytes")
    return data


def _map(function, items: list, num_workers: int) -> list:
    if num_workers <= 1 or len(items) < 2:
        return [function(item) for item in items]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        return list(pool.map(function, items, chunksize=max(1, len(items) // (8 * num_workers))))
