"""`ijepa-scale make-shards`: ImageFolder / synset tars / file list -> tar shards and their index."""

from __future__ import annotations

import argparse
import logging

from ..data.convert import make_shards
from ..data.image_sources import SRC_FORMATS
from ..data.shard_format import DatasetError, summary_line
from ..errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale make-shards",
        description="Convert an ImageFolder tree, a folder of per-synset tars or a file list into tar shards "
                    "(local folder or any fsspec URL). Re-running the same command resumes.",
    )
    parser.add_argument("--src", required=True,
                        help="ImageFolder root, folder of <synset>.tar, or a path<TAB>label list file")
    parser.add_argument("--src-format", choices=SRC_FORMATS, default="folder")
    parser.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix) for shards and index")
    parser.add_argument("--prefix", default="train")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--num-shards", type=int, default=None)
    size.add_argument("--samples-per-shard", type=int, default=1000)
    size.add_argument("--shard-bytes", default=None, help="target source bytes per shard, e.g. 1GB")
    parser.add_argument("--resize-short-side", type=int, default=None,
                        help="downscale images whose short side is larger (re-encoded JPEG q95)")
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing shards/index with the same prefix instead of resuming")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        index = make_shards(
            args.src, args.out, src_format=args.src_format, prefix=args.prefix, num_shards=args.num_shards,
            samples_per_shard=args.samples_per_shard, shard_bytes=args.shard_bytes, seed=args.seed,
            resize_short_side=args.resize_short_side, max_per_class=args.max_per_class,
            num_workers=args.workers, overwrite=args.overwrite, progress=True,
        )
    except (DatasetError, UserError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(summary_line(index, args.out))
