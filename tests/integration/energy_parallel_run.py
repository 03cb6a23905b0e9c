"""2 gloo ranks: one training step's gradients of the energy encoder + predictor under DDP, FSDP and FSDP with
activation checkpointing, beside one process on the whole batch.

Usage: python energy_parallel_run.py OUT_FILE
Every rank takes its half of one batch (same masks for all rows) and the parallel mode averages the halves'
gradients, which equals the gradient of the whole batch's mean loss. Rank 0 saves
{mode: {"loss": float, "grads": {name: full tensor}}} to OUT_FILE, mode in single, ddp, fsdp, fsdp_ac.
"""

import os
import sys

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from ijepa_scale.distributed import env as dist_utils
from ijepa_scale.masks import MultiBlockMaskCollator
from ijepa_scale.models import build_encoder, build_predictor
from ijepa_scale.models.energy_transformer import EnergyConfig
from ijepa_scale.models.utils import apply_masks, repeat_interleave_batch
from ijepa_scale.distributed.parallel import ParallelPlan, full, parallelize, unwrap

BATCH = 8
MODES = {"ddp": ParallelPlan(mode="ddp"), "fsdp": ParallelPlan(mode="fsdp"),
         "fsdp_ac": ParallelPlan(mode="fsdp", activation_checkpointing=True)}


def models():
    torch.manual_seed(0)
    energy = EnergyConfig(steps=2, hidden_dim=32, pred_hidden_dim=32)
    encoder = build_encoder("energy_transformer", img_size=16, patch_size=4, embed_dim=16, num_heads=2,
                            energy=energy)
    predictor = build_predictor(encoder, pred_depth=1, pred_emb_dim=16, energy=energy)
    with torch.no_grad():  # larger than the near-identity init, so the energy terms shape the gradients
        for module in (encoder, predictor):
            for name in ("wq", "wk", "memories"):
                getattr(module.block, name).normal_(0, 0.3)
    target = build_encoder("energy_transformer", img_size=16, patch_size=4, embed_dim=16, num_heads=2,
                           energy=energy)
    target.load_state_dict(encoder.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)
    return encoder, predictor, target


def batch():
    images = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    collator = MultiBlockMaskCollator(input_size=16, patch_size=4, enc_mask_scale=(0.85, 1.0),
                                      pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=2,
                                      min_keep=2, allow_overlap=False, seed=0)
    masks_enc, masks_pred = collator.sample(1, 0)  # one image's masks, shared by every row
    return images, [m.expand(BATCH, -1) for m in masks_enc], [m.expand(BATCH, -1) for m in masks_pred]


def step(encoder, predictor, target, images, masks_enc, masks_pred) -> dict:
    with torch.no_grad():
        h = target(images)
        h = F.layer_norm(h, (h.size(-1),))
        h = repeat_interleave_batch(apply_masks(h, masks_pred), len(images), repeat=len(masks_enc))
    z = predictor(encoder(images, masks_enc), masks_enc, masks_pred)
    loss = F.smooth_l1_loss(z, h)
    loss.backward()
    grads = {}
    for prefix, module in (("encoder", encoder), ("predictor", predictor)):
        for name, p in unwrap(module).named_parameters():
            grads[f"{prefix}.{name}"] = full(p.grad).detach().clone()
    return {"loss": float(loss.detach()), "grads": grads}


def worker(rank, out_file):
    torch.set_num_threads(1)
    dist_utils.init_distributed(rank, 2, torch.device("cpu"))
    images, masks_enc, masks_pred = batch()
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    results = {}
    with dist_utils.leave_group_after():
        if rank == 0:
            results["single"] = step(*models(), images, masks_enc, masks_pred)
        for mode, plan in MODES.items():
            encoder, predictor, target = models()
            cpu = torch.device("cpu")
            encoder, predictor = parallelize(encoder, cpu, plan), parallelize(predictor, cpu, plan)
            target = parallelize(target, cpu, plan, trainable=False)
            results[mode] = step(encoder, predictor, target, images[half], [m[half] for m in masks_enc],
                                 [m[half] for m in masks_pred])
        if rank == 0:
            torch.save(results, out_file)


if __name__ == "__main__":
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(dist_utils.find_free_port())
    mp.start_processes(worker, args=(sys.argv[1],), nprocs=2, start_method="spawn")
