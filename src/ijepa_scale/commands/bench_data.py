"""`ijepa-scale bench-data`: throughput of the training input pipeline."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..benchmarks.data import (
    __doc__ as DATA_DOC, MissingDependencyError, round_floats, benchmark_stream, format_table, write_photo_shards,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale bench-data", description=DATA_DOC.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(DATA_DOC.splitlines()[1:]),
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--shards", help="shard URL or brace pattern (local path or fsspec URL), as data.shards")
    data.add_argument("--make-photo-shards", metavar="DIR",
                      help="first write benchmark shards of real photos (scikit-image/scikit-learn) in DIR")
    parser.add_argument("--index", default=None, help="shard index JSON (default: found beside the shards)")
    parser.add_argument("--num-images", type=int, default=2000, help="with --make-photo-shards")
    parser.add_argument("--num-shards", type=int, default=8, help="with --make-photo-shards")
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    parser.add_argument("--batches", type=int, default=20, help="batches timed after the warm-up")
    parser.add_argument("--warmup", type=int, default=None,
                        help="batches before the clock starts (default: max(2, workers))")
    parser.add_argument("--world-size", type=int, default=1, help="simulate one rank of this many")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-core-images", type=int, default=512,
                        help="images for the single-process decode+transform measurement")
    parser.add_argument("--rss-epochs", type=int, default=0,
                        help="then run this many full epochs with the largest worker count and report RSS per epoch")
    args = parser.parse_args(argv)
    if args.batches < 1 or (args.warmup is not None and args.warmup < 0):
        parser.error("--batches must be >= 1 and --warmup >= 0")
    if any(w < 0 for w in args.workers):
        parser.error("--workers must be >= 0")
    if args.per_core_images < 1:
        parser.error("--per-core-images must be >= 1")

    torch.set_num_threads(1)
    try:
        if args.make_photo_shards:
            pattern = write_photo_shards(args.make_photo_shards, args.num_images, args.num_shards, seed=args.seed)
        else:
            pattern = args.shards
        summary = benchmark_stream(
            pattern, args.workers, batch_size=args.batch_size, crop_size=args.crop_size,
            patch_size=args.patch_size, batches=args.batches, warmup=args.warmup,
            world_size=args.world_size, rank=args.rank, shuffle_buffer=args.shuffle_buffer,
            seed=args.seed, index_url=args.index, per_core_images=args.per_core_images,
            rss_epochs=args.rss_epochs, log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (MissingDependencyError, ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")

    print(
        f"\ndata pipeline: {summary['num_samples']} samples in {summary['num_shards']} shards "
        f"(mean {summary['mean_jpeg_kb']:.0f} KB/image), batch {summary['batch_size']}, crop {summary['crop_size']}, "
        f"rank {summary['rank']}/{summary['world_size']}, shuffle buffer {summary['shuffle_buffer']}, "
        f"{summary['cpus']} CPUs, load {summary['loadavg_1m_start']} -> {summary['loadavg_1m_end']}"
    )
    print(format_table(summary))
    print(json.dumps(round_floats(summary, 2)))
