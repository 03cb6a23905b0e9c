"""`ijepa-scale show-masks`: the configured sampler's blocks over real images."""

import yaml

from ijepa_scale.config import load_config
from ijepa_scale.commands.show_masks import main
from ijepa_scale.masks.show import sample_batch


def write_config(tmp_path, shards):
    config = {
        "data": {"batch_size": 4, "crop_size": 32, "num_workers": 0, "shards": shards, "pin_mem": False},
        "logging": {"folder": str(tmp_path / "logs")},
        "mask": {"patch_size": 8, "enc_mask_scale": [0.85, 1.0], "pred_mask_scale": [0.15, 0.3],
                 "aspect_ratio": [0.75, 1.5], "num_pred_masks": 3, "min_keep": 2, "allow_overlap": False},
        "meta": {"model_name": "vit_tiny"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_masks_of_the_config_over_its_images(shards, tmp_path, capsys):
    path = write_config(tmp_path, shards)
    images, masks_enc, masks_pred = sample_batch(load_config(str(path), []), num_images=3)
    assert images.shape == (3, 3, 32, 32) and len(masks_pred) == 3 and masks_enc[0].shape[0] == 3
    for i in range(3):  # allow_overlap: false -> the context never holds a target patch
        targets = set().union(*(set(m[i].tolist()) for m in masks_pred))
        assert not targets & set(masks_enc[0][i].tolist())
    out = tmp_path / "m.png"
    assert main(["--fname", str(path), "--out", str(out), "--images", "3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000
    assert "3 image(s), context + 3 target blocks" in capsys.readouterr().out
    assert main(["--fname", str(tmp_path / "missing.yaml")]) == 2
