"""`ijepa-scale export SOURCE OUT --format hf|official [--key K] [--num-heads N] [--overwrite]`."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError, one_line
from ..weights.export import FORMATS, KEYS, export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ijepa-scale export",
        description="Write a checkpoint (registry name, URL, official .pth.tar, our checkpoint, run or .dcp folder, "
                    "Hugging Face directory/.safetensors) as a Hugging Face IJepaModel directory or as the "
                    "official single-file .pth.tar. The output is written whole or not at all, and never over "
                    "the source.")
    parser.add_argument("source")
    parser.add_argument("out", help="output folder (--format hf) or file (--format official)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--key", choices=KEYS, default="target_encoder",
                        help="--format hf: which encoder (default target_encoder, what the paper evaluates; the "
                             "published facebook/ijepa_* ports hold 'encoder')")
    parser.add_argument("--num-heads", type=int, default=None, help="only for widths outside the official table")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (never the source)")
    args = parser.parse_args(argv)
    try:
        print(export(args.source, args.out, args.format, key=args.key, num_heads=args.num_heads,
                     overwrite=args.overwrite))
    except (UserError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0
