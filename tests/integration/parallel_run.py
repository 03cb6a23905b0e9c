"""Drive the Trainer on 2 gloo ranks through several parallel settings on the same synthetic batches.

Usage: python parallel_run.py SHARDS OUT_DIR OUT_FILE VARIANT_JSON [VARIANT_JSON ...]
A variant is {"name": ..., "batch": B, "accum": N, "overrides": {"distributed.parallel": "fsdp", ...}}.
Every variant sees the same images and masks per step: a step's 2B... images on a rank are one
batch of `batch * accum`, split into `accum` micro-batches with the same masks.  Rank 0 saves
{name: {"losses": [...], "encoder": {...}, "target_encoder": {...}}} (full tensors) to OUT_FILE.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ijepa_scale.distributed import env as dist_utils
from ijepa_scale.config import apply_overrides, config_from_dict
from ijepa_scale.distributed.parallel import full, unwrap
from ijepa_scale.training.trainer import Trainer
from tests.integration.common import tiny_config

STEPS = 3


def synthetic_batches(trainer, rank, total_batch, accum, step):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    images = torch.randint(0, 256, (total_batch, 3, 32, 32), dtype=torch.uint8, generator=generator)
    masks_enc, masks_pred = trainer.batches.collator.sample(total_batch, step=step, rank=rank)
    size = total_batch // accum
    micro = []
    for i in range(accum):
        part = slice(i * size, (i + 1) * size)
        micro.append({"images": images[part], "masks_enc": [m[part] for m in masks_enc],
                      "masks_pred": [m[part] for m in masks_pred], "epoch": 0, "batch": step * accum + i,
                      "errors": [], "usable": True})
    return micro if accum > 1 else micro[0]


def worker(rank, shards, out_dir, out_file, variants):
    torch.set_num_threads(1)
    env = dist_utils.init_distributed(rank, 2, torch.device("cpu"))
    results = {}
    with dist_utils.leave_group_after():
        for variant in variants:
            raw = tiny_config(shards, Path(out_dir) / variant["name"])
            raw["data"]["num_workers"] = 0
            raw["data"]["batch_size"] = variant["batch"]
            overrides = [f"distributed.accum_steps={variant['accum']}"]
            overrides += [f"{k}={v}" for k, v in variant.get("overrides", {}).items()]
            trainer = Trainer(config_from_dict(apply_overrides(raw, overrides)), env)
            total = variant["batch"] * variant["accum"]
            losses = [trainer.train_step(synthetic_batches(trainer, rank, total, variant["accum"], step))["loss"]
                      for step in range(STEPS)]
            weights = {key: {k: full(v).detach().clone() for k, v in module.state_dict().items()}
                       for key, module in (("encoder", unwrap(trainer.networks["encoder"])),
                                           ("target_encoder", trainer.ema_networks["target_encoder"]))}
            results[variant["name"]] = {"losses": losses, **weights}
            trainer.close()
        if rank == 0:
            torch.save(results, out_file)


if __name__ == "__main__":
    shards, out_dir, out_file, *specs = sys.argv[1:]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(dist_utils.find_free_port())
    mp.start_processes(worker, args=(shards, out_dir, out_file, [json.loads(s) for s in specs]), nprocs=2,
                       start_method="spawn")
