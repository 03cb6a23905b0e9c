"""`ijepa-scale eval` in one process: checkpoint sources (ours, official, run folder), rows, one-line errors."""

import pandas as pd
import pytest
import torch

from ijepa_scale.cli import main as cli_main
from ijepa_scale.config import config_from_dict
from ijepa_scale.commands.eval import main
from ijepa_scale.evaluation.evaluate import build_eval_encoder
from ijepa_scale.models import build_encoder
from tests.helpers.photos import make_photo_shards


def prefixed(module):
    return {f"module.{k}": v for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_photo_shards(folder, sizes=[10, 10], num_classes=2, size=(40, 30), prefix="train")
    make_photo_shards(folder, sizes=[8], num_classes=2, size=(40, 30), seed=3, prefix="val")
    return str(folder / "train-{000000..000001}.tar"), str(folder / "val-000000.tar")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A checkpoint in our format: the architecture is in its config (48 wide, 3 heads: not an official size)."""
    folder = tmp_path_factory.mktemp("run")
    cfg = config_from_dict({"data": {"shards": "x.tar", "crop_size": 16},
                            "mask": {"patch_size": 8},
                            "meta": {"model_name": "vit_tiny", "embed_dim": 48, "depth": 4, "num_heads": 3}})
    torch.manual_seed(1)
    encoder = build_encoder("vit_tiny", img_size=16, patch_size=8, embed_dim=48, depth=4, num_heads=3)
    torch.save({"encoder": prefixed(encoder), "target_encoder": prefixed(encoder), "step": 7,
                "config": cfg.to_dict()}, folder / "jepa-latest.pth.tar")
    return folder, encoder


def test_usage_names_the_eval_command(capsys):
    assert cli_main([]) == 2
    assert "eval linear|knn" in capsys.readouterr().out


def test_our_checkpoint_from_its_run_folder(shards, ours, capsys):
    folder, encoder = ours
    loaded, size = build_eval_encoder(folder / "jepa-latest.pth.tar", "target_encoder")
    assert size == 16 and loaded.num_heads == 3
    for name, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    random, _ = build_eval_encoder(folder / "jepa-latest.pth.tar", "target_encoder", random_init=True)
    assert not torch.equal(random.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)

    train, val = shards
    assert main(["both", "--checkpoint", str(folder), "--train-shards", train, "--val-shards", val,
                 "--pool", "last4", "--random-init", "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert "target_encoder (random init)" in out and "appended 4 row(s)" in out
    rows = pd.read_csv(folder / "eval.csv")
    assert rows["method"].tolist() == ["linear", "knn", "linear", "knn"]
    assert (rows["step"] == 7).all() and (rows["pool"] == "last4").all()
    assert (rows["n_train"] == 20).all() and (rows["n_val"] == 8).all()
    assert rows["accuracy"].between(0, 1).all()


def test_official_checkpoint_architecture_from_the_weights(shards, tmp_path, capsys):
    torch.manual_seed(2)
    encoder = build_encoder("vit_tiny", img_size=16, patch_size=8, depth=1)  # 192 wide: heads from the size table
    path = tmp_path / "IN1K-vit.t.8-1e.pth.tar"
    torch.save({"encoder": prefixed(encoder), "target_encoder": prefixed(encoder), "epoch": 3}, path)
    loaded, size = build_eval_encoder(path, "encoder")
    assert size == 16 and loaded.num_heads == 3
    assert torch.equal(loaded.pos_embed, encoder.pos_embed)
    random, _ = build_eval_encoder(path, "encoder", random_init=True)
    assert random.embed_dim == 192 and len(random.blocks) == 1
    train, val = shards
    assert main(["knn", "--checkpoint", str(path), "--train-shards", train, "--val-shards", val,
                 "--key", "encoder"]) == 0
    rows = pd.read_csv(tmp_path / "eval.csv")
    assert rows[["step", "key", "method"]].values.tolist() == [["ep3", "encoder", "knn"]]


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file or folder"),
    ("empty_folder", "must hold exactly one *-latest.pth.tar (found none)"),
    ("not_a_checkpoint", "cannot load it"),
    ("no_key", "no 'target_encoder' weights (it has: encoder)"),
    ("missing_shard", "--val-shards: shard not found"),
    ("unlabelled", "without a class label (.cls member)"),
])
def test_bad_input_is_one_line_and_exit_2(case, message, shards, ours, tmp_path, capsys):
    folder, encoder = ours
    train, val = shards
    checkpoint = str(folder)
    if case == "missing":
        checkpoint = str(tmp_path / "nope.pth.tar")
    elif case == "empty_folder":
        checkpoint = str(tmp_path)
    elif case == "not_a_checkpoint":
        checkpoint = str(tmp_path / "garbage.pth.tar")
        (tmp_path / "garbage.pth.tar").write_bytes(b"not a checkpoint")
    elif case == "no_key":
        checkpoint = str(tmp_path / "context-only.pth.tar")
        torch.save({"encoder": prefixed(encoder)}, checkpoint)
    elif case == "missing_shard":
        val = str(tmp_path / "val-{000000..000001}.tar")
    elif case == "unlabelled":
        import io
        import random
        import tarfile

        from tests.helpers.photos import encode, photo_crop

        with tarfile.open(tmp_path / "nolabel-000000.tar", "w") as tar:  # images only, no .cls
            for i in range(3):
                data = encode(photo_crop(0, (20, 20), random.Random(i)))
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        val = str(tmp_path / "nolabel-000000.tar")
    assert main(["knn", "--checkpoint", checkpoint, "--train-shards", train, "--val-shards", val]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Progress lines may come first (the labels are checked once the features exist); the error is one line.
    assert err[-1].startswith("error:") and message in err[-1], err
    assert sum("error" in line for line in err) == 1, err


@pytest.mark.parametrize("flags,message", [
    (["--shots", "0"], "every N must be > 0"),
    (["--shots", "1,ten"], "expected labelled images per class as N[,N...]"),
    (["--seeds", "0"], "--seeds must be > 0"),
])
def test_bad_shot_flags_are_usage_errors(flags, message, shards, ours, capsys):
    train, val = shards
    with pytest.raises(SystemExit) as exc:
        main(["linear", "--checkpoint", str(ours[0]), "--train-shards", train, "--val-shards", val, *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_more_shots_than_a_class_has_is_one_line(shards, ours, capsys):
    train, val = shards
    assert main(["knn", "--checkpoint", str(ours[0]), "--train-shards", train, "--val-shards", val,
                 "--shots", "2,11"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --shots 11: class") and "use at most 10 shots" in err[-1], err


def test_shots_and_baselines_rows(shards, ours, tmp_path, capsys):
    train, val = shards
    out = tmp_path / "e.csv"
    assert main(["knn", "--checkpoint", str(ours[0]), "--train-shards", train, "--val-shards", val, "--shots", "3,1",
                 "--seeds", "2", "--baselines", "--csv", str(out)]) == 0
    rows = pd.read_csv(out, keep_default_na=False)
    assert rows["key"].tolist() == [k for k in ("target_encoder", "target_encoder (random init)", "raw pixels")
                                    for _ in range(3)]
    assert rows["shots"].astype(str).tolist() == ["", "1", "3"] * 3 and (rows["method"] == "knn").all()
    assert rows["seeds"].astype(str).tolist() == ["", "2", "2"] * 3
    assert "raw pixels" in capsys.readouterr().out
