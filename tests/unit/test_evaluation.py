"""Frozen-feature evaluation pieces: k-NN votes, the L-BFGS probe, pooling, sharded features, report."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_scale.data.sources import open_shards
from ijepa_scale.evaluation.features import eval_image, extract_features, gather_features, pooled_features, rank_range
from ijepa_scale.evaluation.knn import knn_accuracy, knn_predict
from ijepa_scale.evaluation.linear import fit_logistic, linear_probe
from ijepa_scale.evaluation.table import CSV_COLUMNS, append_rows, format_table
from ijepa_scale.models import build_encoder
from tests.helpers.photos import encode, make_photo_shards


def blobs(n_per_class, num_classes, dim, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    # One very close neighbour of class 0 outweighs two farther ones of class 1 (a plain vote would say 1).
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.07).tolist() == [0]
    # With a very high temperature the weights are nearly equal: the majority wins.
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=1e3).tolist() == [1]
    # k larger than the bank is capped; cosine ignores the scale of a feature.
    assert knn_predict(bank * 7, labels, query * 0.1, num_classes=2, k=50).tolist() == [0]


def test_knn_accuracy_on_separated_and_on_random_labels():
    x, y = blobs(40, 4, 16, spread=0.5, seed=0)
    vx, vy = blobs(10, 4, 16, spread=0.5, seed=0)
    assert knn_accuracy(x, y, vx, vy, num_classes=4) == 1.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert knn_accuracy(x, shuffled, vx, vy, num_classes=4) < 0.6


def test_logistic_fit_matches_scikit_learn_optimum():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(30, 3, 5, spread=2.0, seed=2)
    l2 = 0.01
    weight, bias = fit_logistic(x.double(), y, 3, l2, max_iter=500)
    # sklearn minimises sum CE + |W|^2 / (2C); ours mean CE + l2/2 |W|^2, so C = 1 / (l2 n).
    reference = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    # Softmax weights are defined up to a shared shift per feature; the L2 term picks zero-mean columns.
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=2e-3)
    np.testing.assert_allclose((bias - bias.mean()).numpy(), reference.intercept_ - reference.intercept_.mean(),
                               atol=2e-3)


def test_linear_probe_chooses_l2_on_held_out_features_and_scores_val():
    x, y = blobs(60, 5, 20, spread=2.5, seed=3)
    vx, vy = blobs(20, 5, 20, spread=2.5, seed=3)
    result = linear_probe(x, y, vx, vy, num_classes=5, l2_grid=(1.0, 1e-2, 1e-4))
    assert set(result["holdout"]) == {1.0, 1e-2, 1e-4}
    assert result["l2"] == max(result["holdout"], key=lambda l2: (result["holdout"][l2], l2))
    assert result["accuracy"] > 0.9
    # Labels unrelated to the features: close to chance.
    noise = torch.randint(0, 5, (len(y),), generator=torch.Generator().manual_seed(4))
    assert linear_probe(x, noise, vx, vy, num_classes=5)["accuracy"] < 0.45


def test_pooling_mean_and_last4_blocks():
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=24, depth=5, num_heads=2).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(pooled_features(encoder, images, "mean"), encoder(images).mean(dim=1))
        x = encoder.patch_embed(images) + encoder.pos_embed
        outputs = []
        for block in encoder.blocks:
            x = block(x)
            outputs.append(x.mean(dim=1))
        last4 = pooled_features(encoder, images, "last4")
    assert last4.shape == (3, 4 * 24)
    torch.testing.assert_close(last4, torch.cat(outputs[-4:], dim=1))
    assert not encoder.blocks[-1]._forward_hooks  # hooks removed
    shallow = build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=2)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        pooled_features(shallow, images, "last4")


def test_eval_image_takes_the_centre_square_without_randomness():
    # 30 x 10: left third red, middle green, right blue -> the centre square is green.
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :10, 0] = pixels[:, 10:20, 1] = pixels[:, 20:, 2] = 255
    data = encode(Image.fromarray(pixels), "PNG")
    image = eval_image(data, 8)
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    inner = image[:, :, 1:-1]  # the bilinear filter blends the border columns a little with their neighbours
    assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()
    assert torch.equal(image, eval_image(data, 8))
    grey = eval_image(encode(Image.fromarray(pixels[:, :, 1]).convert("L"), "PNG"), 8)
    assert grey.shape == (3, 8, 8) and torch.equal(grey[0], grey[2])


def test_rank_parts_cover_every_sample_once(tmp_path):
    make_photo_shards(tmp_path, sizes=[7, 5, 6], num_classes=3, size=(40, 30))
    source = open_shards(str(tmp_path / "train-{000000..000002}.tar"))
    assert [rank_range(18, r, 4) for r in range(4)] == [(0, 4), (4, 9), (9, 13), (13, 18)]
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", img_size=16, patch_size=8, embed_dim=12, depth=1, num_heads=2)
    whole = extract_features(encoder, source, crop_size=16, batch_size=4, num_workers=0)
    assert whole.features.shape == (18, 12) and whole.skipped == 0
    # Workers interleave their batches: the same rows in another order.
    workers = extract_features(encoder, source, crop_size=16, batch_size=4, num_workers=2)
    order_a, order_b = whole.features[:, 0].argsort(), workers.features[:, 0].argsort()
    torch.testing.assert_close(workers.features[order_b], whole.features[order_a])
    assert torch.equal(workers.labels[order_b], whole.labels[order_a])
    # Sample j has class j % 3: 6 of each.
    assert torch.bincount(whole.labels).tolist() == [6, 6, 6]
    parts = [extract_features(encoder, source, crop_size=16, batch_size=5, rank=r, world_size=3, gather=False)
             for r in range(3)]
    assert [len(p.labels) for p in parts] == [6, 6, 6]
    joined = torch.cat([p.features for p in parts])
    assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
    torch.testing.assert_close(joined, whole.features)
    assert torch.equal(gather_features(parts[0]).features, parts[0].features)  # one process: itself


def test_extraction_leaves_the_global_rng_and_encoder_mode_alone(tmp_path):
    make_photo_shards(tmp_path, sizes=[6], num_classes=2, size=(20, 20))
    source = open_shards(str(tmp_path / "train-000000.tar"))
    encoder = build_encoder("vit_tiny", img_size=16, patch_size=8, embed_dim=12, depth=1, num_heads=2).train()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    extract_features(encoder, source, crop_size=16, num_workers=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert encoder.training


def test_report_table_and_csv(tmp_path):
    row = {"checkpoint": "run/jepa-latest.pth.tar", "step": 117, "key": "target_encoder", "pool": "mean",
           "method": "knn", "accuracy": 0.8125, "n_train": 5000, "n_val": 1000, "seconds": 12.5}
    table = format_table([row, {**row, "method": "linear", "accuracy": 0.85}])
    assert table.splitlines()[0].split() == list(CSV_COLUMNS)
    assert "0.8125" in table and "0.8500" in table
    path = tmp_path / "eval.csv"
    append_rows(path, [row])
    append_rows(path, [{**row, "step": 234}])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["117", "234"] and rows[0]["accuracy"] == "0.8125"
    path.write_text("other,header\n1,2\n")
    append_rows(path, [row])
    assert path.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    assert len(list(tmp_path.glob("eval.previous-*.csv"))) == 1
