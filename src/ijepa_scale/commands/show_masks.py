"""`ijepa-scale show-masks --fname CONFIG --out masks.png`: the configured mask sampler over real images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError, one_line
from ..masks.show import draw, sample_batch


def main(argv=None) -> int:
    from ..config import load_config

    parser = argparse.ArgumentParser(
        prog="ijepa-scale show-masks",
        description="Draw the configured context and target blocks over real images of the configured data.")
    parser.add_argument("--fname", required=True, help="YAML config (the same as for training)")
    parser.add_argument("--out", default="masks.png", help="PNG path (default masks.png)")
    parser.add_argument("--images", type=int, default=4, help="how many images (rows), default 4")
    parser.add_argument("--step", type=int, default=0,
                        help="the training step whose mask sizes to draw (sizes are drawn per step)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as mask.num_pred_masks=2")
    args = parser.parse_args(argv)
    try:
        if args.images < 1:
            raise UserError(f"--images {args.images}: give at least 1")
        cfg = load_config(args.fname, args.overrides)
        images, masks_enc, masks_pred = sample_batch(cfg, args.images, args.step)
        m = cfg.mask
        title = (f"{Path(args.fname).name}: crop {cfg.data.crop_size}, patch {m.patch_size}; context scale "
                 f"{list(m.enc_mask_scale)}, {m.num_pred_masks} target(s) scale {list(m.pred_mask_scale)} aspect "
                 f"{list(m.aspect_ratio)}")
        out = draw(images, masks_enc, masks_pred, m.patch_size, Path(args.out), title)
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({images.shape[0]} image(s), context + {len(masks_pred)} target blocks each)")
    return 0
