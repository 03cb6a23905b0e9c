"""Cost of one I-JEPA training step with the energy transformer vs a ViT of the same width.

    ijepa-scale bench-energy [--embed-dim 128 --steps 6 --batch 16 --img 32 --patch 4]

Each model pair (encoder + predictor, predictor at the same width) runs forward, smooth-L1 against
fixed targets and backward; the median wall time per step over ``--iters`` steps is printed, after
``--warmup`` untimed steps. The ViT has depth = steps (one block per energy iteration, so both apply
the same number of token mixings). The energy transformer runs both ways of taking dE/dg: autograd
with create_graph (second order) and the closed form.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ..masks import MultiBlockMaskCollator
from ..models.energy_transformer import EnergyPredictor, EnergyTransformer
from ..models.vision_transformer import VisionTransformer, VisionTransformerPredictor


def _models(kind: str, args):
    heads = args.heads
    if kind == "vit":
        enc = VisionTransformer(img_size=args.img, patch_size=args.patch, embed_dim=args.embed_dim,
                                depth=args.steps, num_heads=heads)
        pred = VisionTransformerPredictor(enc.num_patches, args.embed_dim, args.embed_dim, depth=args.steps,
                                          num_heads=heads)
    else:
        gradient = kind.split("-")[1]
        enc = EnergyTransformer(img_size=args.img, patch_size=args.patch, embed_dim=args.embed_dim,
                                num_heads=heads, hidden_dim=8 * args.embed_dim, steps=args.steps, gradient=gradient)
        pred = EnergyPredictor(enc.num_patches, args.embed_dim, args.embed_dim, num_heads=heads,
                               hidden_dim=8 * args.embed_dim, steps=args.steps, gradient=gradient)
    return enc, pred


def measure(kind: str, args) -> tuple[float, int]:
    torch.manual_seed(0)
    enc, pred = _models(kind, args)
    params = sum(p.numel() for m in (enc, pred) for p in m.parameters())
    opt = torch.optim.AdamW(list(enc.parameters()) + list(pred.parameters()), lr=1e-4)
    coll = MultiBlockMaskCollator(input_size=args.img, patch_size=args.patch, enc_mask_scale=(0.85, 1.0),
                                  pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                  min_keep=4, allow_overlap=False, seed=0)
    images = torch.randn(args.batch, 3, args.img, args.img)
    masks_enc, masks_pred = coll.sample(args.batch, 0)
    times = []
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        z = pred(enc(images, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, torch.zeros_like(z))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), params

