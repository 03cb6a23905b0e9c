"""`ijepa-scale fashion-mnist`: Debian's dataset-fashion-mnist -> tar shards."""

from __future__ import annotations

import argparse

from ..data.fashion_mnist import SPLIT_FILES, DEFAULT_SOURCE_DIR, make_fashion_mnist_shards
from ..data.shard_format import DatasetError, summary_line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale fashion-mnist",
        description="Convert Debian's dataset-fashion-mnist into tar shards.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", choices=sorted(SPLIT_FILES), default="train")
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=None,
                        help="class-balanced subset: this many samples per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source-dir", default=DEFAULT_SOURCE_DIR)
    args = parser.parse_args(argv)
    try:
        index = make_fashion_mnist_shards(
            args.out, split=args.split, num_shards=args.num_shards, per_class=args.per_class,
            seed=args.seed, source_dir=args.source_dir,
        )
    except DatasetError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(summary_line(index, args.out))
