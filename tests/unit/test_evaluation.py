"""Frozen-feature evaluation pieces: k-NN votes, the L-BFGS probe, pooling, sharded features, report."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_scale.data.sources import open_shards
from ijepa_scale.evaluation.evaluate import assign_jobs, evaluate_encoders
from ijepa_scale.evaluation.features import (RAW_PIXELS, FeatureSet, eval_image, extract_features, gather_features,
                                             pooled_features, rank_range, raw_pixel_features)
from ijepa_scale.evaluation.knn import knn_accuracy, knn_predict
from ijepa_scale.evaluation.linear import (ONE_SHOT_L2, few_shot_probe, feature_stats, fit_logistic, linear_probe,
                                           sample_shots, select_l2, stratified_folds)
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
    assert {1.0, 1e-2, 1e-4} <= set(result["holdout"])  # the grid may widen, never shrink
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


@pytest.mark.parametrize("peak,best,at_bound", [(1e-8, 1e-8, False), (1e2, 1e2, False), (1e-12, 1e-9, True)])
def test_l2_grid_widens_past_an_edge_until_the_best_is_inside(peak, best, at_bound):
    seen = []

    def score(l2, init):
        seen.append((l2, init))
        return -abs(np.log10(l2) - np.log10(peak)), l2  # the state is the L2 itself

    result = select_l2(score, grid=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6), bounds=(1e-9, 1e3))
    assert result["l2"] == pytest.approx(best) and result["at_bound"] == at_bound
    lo, hi = result["grid"]
    if not at_bound:
        assert lo < result["l2"] < hi  # inside, one step past the peak
    assert result["widened"] == len(seen) - 6 > 0
    # Each fit after the first warm-starts from the nearest L2 scored before it.
    assert seen[0][1] is None and all(init is not None for _, init in seen[1:])
    assert seen[1][1] == seen[0][0]


def test_l2_grid_does_not_widen_when_the_best_is_inside():
    result = select_l2(lambda l2, init: (-abs(np.log10(l2) + 3), None), grid=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5))
    assert result["l2"] == pytest.approx(1e-3) and result["widened"] == 0 and not result["at_bound"]


def test_linear_probe_widens_to_a_strong_l2_on_an_overfitting_problem():
    # Few noisy samples in many dimensions: the held-out accuracy wants more regularisation than 1e-4.
    x, y = blobs(15, 3, 60, spread=12.0, seed=5)
    vx, vy = blobs(30, 3, 60, spread=12.0, seed=5)
    result = linear_probe(x, y, vx, vy, num_classes=3, l2_grid=(1e-4, 1e-5, 1e-6))
    assert result["selection"]["widened"] > 0 and result["l2"] > 1e-4
    assert min(result["holdout"]) < result["l2"] < max(result["holdout"])


def test_shot_sampling_is_exact_per_class_and_deterministic_per_seed():
    labels = torch.arange(4).repeat(25)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    a = sample_shots(labels, 3, seed=0, num_classes=4)
    assert torch.bincount(labels[a], minlength=4).tolist() == [3, 3, 3, 3] and len(set(a.tolist())) == 12
    assert torch.equal(a, sample_shots(labels, 3, seed=0, num_classes=4))
    draws = {tuple(sample_shots(labels, 3, seed=s, num_classes=4).tolist()) for s in range(5)}
    assert len(draws) == 5
    with pytest.raises(ValueError, match="class 0 has only 25"):
        sample_shots(labels, 26, seed=0, num_classes=4)
    folds = stratified_folds(labels[a], 3, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(12))
    assert all(sorted(labels[a][f].tolist()) == [0, 1, 2, 3] for f in folds)  # every class in every fold


def test_few_shot_probe_cross_validates_inside_the_shots():
    x, y = blobs(200, 4, 20, spread=1.5, seed=6)
    vx, vy = blobs(50, 4, 20, spread=1.5, seed=6)
    stats = feature_stats(x)
    one = few_shot_probe(x[sample_shots(y, 1, 0, 4)], y[sample_shots(y, 1, 0, 4)], vx, vy, 4, 1, stats)
    assert one["l2"] == ONE_SHOT_L2 and one["selection"] is None and one["accuracy"] > 0.5
    index = sample_shots(y, 10, 0, 4)
    ten = few_shot_probe(x[index], y[index], vx, vy, 4, 10, stats, seed=0)
    assert ten["selection"] is not None and ten["l2"] == ten["selection"]["l2"] and ten["accuracy"] > 0.8


def test_jobs_are_shared_out_once_each():
    jobs = [("a", "linear", 0, 0)] + [(n, m, s, k) for n in "ab" for m in ("linear", "knn") for s in (1, 10)
                                      for k in range(3)]
    parts = assign_jobs(jobs, {"a": (1000, 32), "b": (1000, 784)}, 500, 10, 2)
    assert sorted(sum(parts, [])) == sorted(jobs) and all(parts)
    # The costliest (784 wide, 10 shots, cross-validated) go first, one to each rank.
    assert parts[0][0] == ("b", "linear", 10, 0) and parts[1][0] == ("b", "linear", 10, 1)
    assert parts == assign_jobs(jobs, {"a": (1000, 32), "b": (1000, 784)}, 500, 10, 2)  # the same on every rank
    assert sorted(assign_jobs(jobs, {"a": (1000, 32), "b": (1000, 784)}, 500, 10, 1)[0]) == sorted(jobs)


def test_raw_pixels_keep_one_channel_of_grey_images():
    grey = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8).expand(5, 3, 4, 4)
    colour = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    labels = torch.zeros(5, dtype=torch.long)
    train, val = raw_pixel_features(FeatureSet(grey.flatten(1), labels, 0), FeatureSet(grey.flatten(1), labels, 0), 4)
    assert train.features.shape == (5, 16) and train.features.dtype == torch.float32
    train, val = raw_pixel_features(FeatureSet(grey.flatten(1), labels, 0), FeatureSet(colour.flatten(1), labels, 0),
                                    4)
    assert train.features.shape == val.features.shape == (5, 48)


def test_baseline_and_few_shot_rows_from_one_read(tmp_path):
    make_photo_shards(tmp_path, sizes=[12, 12], num_classes=3, size=(40, 30))
    source = open_shards(str(tmp_path / "train-{000000..000001}.tar"))
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny", img_size=8, patch_size=4, embed_dim=12, depth=1, num_heads=2)
    result = evaluate_encoders({"enc": encoder, "raw pixels": RAW_PIXELS}, source, source, ("linear", "knn"),
                               crop_size=8, shots=(1, 2), seeds=3, batch_size=8)
    assert list(result["rows"]) == ["enc", "raw pixels"]
    for rows in result["rows"].values():
        assert [(r["method"], r["shots"]) for r in rows] == [("linear", ""), ("knn", ""), ("linear", 1), ("knn", 1),
                                                             ("linear", 2), ("knn", 2)]
        assert all(0 <= r["accuracy"] <= 1 for r in rows)
        assert rows[2]["seeds"] == 3 and rows[2]["n_train"] == 3 and rows[2]["l2"] == f"{ONE_SHOT_L2:g}"
        assert rows[4]["l2_grid"] and isinstance(rows[4]["accuracy_std"], float)
        assert rows[0]["l2"] and rows[0]["n_train"] == 24
    # The raw pixels of the same images score the same under k-NN with a bank of the query set itself.
    assert result["rows"]["raw pixels"][1]["accuracy"] == 1.0
    with pytest.raises(Exception, match="--shots 9: class"):
        evaluate_encoders({"enc": encoder}, source, source, ("knn",), crop_size=8, shots=(9,), batch_size=8)


def test_an_older_csv_gains_the_new_columns(tmp_path):
    path = tmp_path / "eval.csv"
    old = CSV_COLUMNS[:9]
    path.write_text(",".join(old) + "\n" + "run/x.pth.tar,7,target_encoder,mean,knn,0.5,10,5,1.0\n")
    append_rows(path, [{"checkpoint": "run/x.pth.tar", "step": 8, "key": "raw pixels", "pool": "", "method": "knn",
                        "accuracy": 0.6, "n_train": 10, "n_val": 5, "seconds": 1.0, "shots": 2, "seeds": 3,
                        "accuracy_std": 0.1, "l2": "", "l2_grid": ""}])
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_COLUMNS) and [r["step"] for r in rows] == ["7", "8"]
    assert rows[0]["shots"] == "" and rows[1]["shots"] == "2"
    assert not list(tmp_path.glob("eval.previous-*"))
