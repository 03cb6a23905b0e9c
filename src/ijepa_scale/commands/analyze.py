"""`ijepa-scale analyze attention|corrdim|umap|gates`: pictures of what a checkpoint's encoder learned."""

from __future__ import annotations

import argparse
import functools
import sys

from ..errors import UserError, one_line
from ..evaluation.analyze import __doc__ as ANALYZE_DOC, RUNNERS, SUBCOMMANDS, make_out_dir


def parse_args(argv=None):
    from ..evaluation.evaluate import KEYS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True,
                        help="checkpoint file or URL, or a run folder (its *-latest), as for `ijepa-scale eval`")
    common.add_argument("--shards", required=True, help="tar shards (brace pattern) to read images from")
    common.add_argument("--out", required=True, help="folder for the PNGs and tables (created)")
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--crop-size", type=int, default=None, help="image size (default: the checkpoint's)")
    common.add_argument("--device", default="cpu", help="e.g. cpu or cuda:0 (default cpu)")
    common.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    keyed = argparse.ArgumentParser(add_help=False)
    keyed.add_argument("--key", choices=KEYS, default="target_encoder",
                       help="which network, as for `eval` (default target_encoder; gated|all_open: a Gated I-JEPA "
                            "run's predictor tokens)")
    vit_keyed = argparse.ArgumentParser(add_help=False)
    vit_keyed.add_argument("--key", choices=("target_encoder", "encoder"), default="target_encoder",
                           help="which encoder (default target_encoder)")

    parser = argparse.ArgumentParser(prog="ijepa-scale analyze", description=ANALYZE_DOC.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    p = sub.add_parser("attention", parents=[common, vit_keyed],
                       help="attention maps of chosen layers and heads over images (PNG grid)")
    p.add_argument("--layers", type=int, nargs="+", default=[0, -1], help="block indices, negative from the end "
                   "(default 0 -1)")
    p.add_argument("--heads", type=int, nargs="+", default=None, help="head indices (default all)")
    p.add_argument("--patch", type=int, default=None,
                   help="show how much every query attends to this key patch (default: mean attention received)")
    p.add_argument("--num-images", type=int, default=8, help="images (rows), default 8")
    p.add_argument("--scale", type=int, default=None, help="pixel upscaling of each tile (default: about 112 px)")
    p = sub.add_parser("corrdim", parents=[common, keyed],
                       help="correlation dimension of patch-token embeddings, with its log-log fit (PNG)")
    p.add_argument("--num-images", type=int, default=256, help="images to embed (default 256)")
    p.add_argument("--num-points", type=int, default=4096, help="patch tokens sampled from them (default 4096)")
    p.add_argument("--num-radii", type=int, default=10, help="radii of the correlation integral (default 10)")
    p = sub.add_parser("umap", parents=[common, keyed], help="UMAP of mean-pooled features coloured by class (PNG)")
    p.add_argument("--num-images", type=int, default=2000, help="images (points), default 2000")
    p.add_argument("--n-neighbors", type=int, default=20, help="UMAP n_neighbors (default 20, as the original)")
    p = sub.add_parser("gates", parents=[common],
                       help="Gated I-JEPA: mean gate map, real vs noise open fraction, learned/random/all-open gates")
    p.add_argument("--num-images", type=int, default=512, help="images, default 512")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size", "crop_size", "num_points", "num_radii", "scale", "n_neighbors"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    return args


def analyze_rank(rank: int, world_size: int, device_name: str, *, local_rank: int, cpu_threads: int | None,
                 abort_after_s: float | None = None, args) -> str | None:
    """The analysis runs in one process (rank 0; under torchrun the other ranks have nothing to do)."""
    from ..launchers.entry import setup_logging

    setup_logging(rank, rank0_to_stderr=True)
    if rank != 0:
        return None
    _, summary = RUNNERS[args.command](argparse.Namespace(**{**vars(args), "device": device_name}))
    return summary


def main(argv=None) -> int:
    from ..launchers.entry import setup_logging
    from ..launchers.local import run_ranks

    args = parse_args(argv)
    setup_logging(0, rank0_to_stderr=True)
    try:
        make_out_dir(args.out)
        code, summary = run_ranks(functools.partial(analyze_rank, args=args), [args.device], default_device="cpu",
                                  saves_on_stop=False, device_flag="--device")
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    if summary is not None:
        print(summary)
    return code

