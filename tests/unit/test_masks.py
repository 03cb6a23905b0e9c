import copy
import math
import pickle
import time

import pytest
import torch

from ijepa_scale.benchmarks.masks import OFFICIAL_IN1K_MASK
from ijepa_scale.masks import MultiBlockMaskCollator

OFFICIAL = OFFICIAL_IN1K_MASK


def official(input_size=224, patch_size=14, **overrides):
    return MultiBlockMaskCollator(input_size=input_size, patch_size=patch_size, **{**OFFICIAL, **overrides})


def assert_valid_layout(masks, batch_size, num_patches):
    for m in masks:
        assert m.dtype == torch.int64
        assert m.dim() == 2 and m.shape[0] == batch_size and m.shape[1] >= 1
        assert int(m.min()) >= 0 and int(m.max()) < num_patches
        # strictly increasing rows: sorted and no duplicates
        assert bool((m[:, 1:] > m[:, :-1]).all())


def as_sets(mask):
    return [set(row.tolist()) for row in mask]


def coverage(masks, num_patches):
    return torch.bincount(torch.cat([m.flatten() for m in masks]), minlength=num_patches).float()


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("input_size,patch_size", [(224, 14), (448, 16)])
@pytest.mark.parametrize("nenc", [1, 2])
@pytest.mark.parametrize("legacy", [False, True])
def test_layout_and_rectangular_targets(input_size, patch_size, nenc, legacy):
    col = official(input_size, patch_size, nenc=nenc, legacy_sampler=legacy)
    H = W = input_size // patch_size
    assert (col.height, col.width) == (H, W)
    B = 16
    for step in range(3):
        masks_enc, masks_pred, info = col.sample_with_info(B, step)
        assert len(masks_enc) == nenc and len(masks_pred) == 4
        assert_valid_layout(masks_enc, B, H * W)
        assert_valid_layout(masks_pred, B, H * W)
        assert len({m.shape[1] for m in masks_enc}) == 1  # common K_enc over all enc masks
        # K_enc is the minimum over the batch and over the enc masks
        assert masks_enc[0].shape[1] == int(info["context_lengths"].min())

        (hp, wp), (he, we) = col.block_sizes(step)
        assert info["pred_size"] == (hp, wp) and info["enc_size"] == (he, we)
        assert he == we or he == H or we == W  # context block is square unless clamped
        for m in masks_pred:
            assert m.shape[1] == hp * wp
            rows, cols = m // W, m % W
            top, left = rows.min(1).values, cols.min(1).values
            assert bool((rows.max(1).values - top == hp - 1).all())
            assert bool((cols.max(1).values - left == wp - 1).all())
            expected = (top[:, None] + torch.arange(hp))[:, :, None] * W + (left[:, None] + torch.arange(wp))[:, None, :]
            assert torch.equal(m, expected.reshape(B, hp * wp))

        for e in range(nenc):
            assert bool((info["context_lengths"][:, e] > col.min_keep).all())
            for b in range(B):
                context = set(masks_enc[e][b].tolist())
                targets = set().union(*(set(m[b].tolist()) for m in masks_pred))
                if int(info["relax_level"][b, e]) == 0:
                    assert not context & targets
    assert col.num_relaxed == 0 and col.num_fallback == 0


def test_non_square_grid_and_int_input():
    col = MultiBlockMaskCollator(input_size=(112, 80), patch_size=16, npred=3, nenc=2)
    assert (col.height, col.width) == (7, 5)
    masks_enc, masks_pred = col.sample(8, 0)
    assert_valid_layout(masks_enc + masks_pred, 8, 35)
    col = MultiBlockMaskCollator(input_size=96, patch_size=16)
    assert (col.height, col.width) == (6, 6)


def test_relaxation_is_counted_and_keeps_leading_exclusions():
    # Big targets on a small grid: most context candidates keep <= min_keep patches.
    col = MultiBlockMaskCollator(
        input_size=64, patch_size=16, enc_mask_scale=(0.5, 0.6), pred_mask_scale=(0.4, 0.5),
        aspect_ratio=(1.0, 1.0), npred=3, min_keep=3,
    )
    total_relaxed = 0
    for step in range(20):
        masks_enc, masks_pred, info = col.sample_with_info(32, step)
        level = info["relax_level"][:, 0]
        total_relaxed += int((level > 0).sum())
        for b in range(32):
            context = set(masks_enc[0][b].tolist())
            targets = [set(m[b].tolist()) for m in masks_pred]
            overlaps = bool(context & set().union(*targets))
            if overlaps:
                assert int(level[b]) > 0
            # the first npred - level target exclusions are always respected
            for k in range(3 - int(level[b])):
                assert not context & targets[k]
    assert total_relaxed > 0
    assert col.num_relaxed == total_relaxed


def test_allow_overlap_never_relaxes():
    col = official(allow_overlap=True)
    masks_enc, masks_pred, info = col.sample_with_info(32, 0)
    (he, we) = info["enc_size"]
    assert masks_enc[0].shape[1] == he * we  # full context block, no exclusion
    assert col.num_relaxed == 0 and not bool(info["fallback"].any())


# --------------------------------------------------------------------------- determinism
def test_same_inputs_same_masks_and_sensitivity():
    col = official()
    enc_a, pred_a = col.sample(32, step=7, rank=1)
    enc_b, pred_b = official().sample(32, step=7, rank=1)
    for x, y in zip(enc_a + pred_a, enc_b + pred_b):
        assert torch.equal(x, y)

    _, pred_step = col.sample(32, step=8, rank=1)
    enc_rank, pred_rank = col.sample(32, step=7, rank=2)
    _, pred_seed = official(seed=1).sample(32, step=7, rank=1)
    # other rank, same step: same block sizes, different positions
    assert col.block_sizes(7) == official(rank=5).block_sizes(7)
    assert [m.shape for m in pred_rank] == [m.shape for m in pred_a]
    assert not torch.equal(pred_rank[0], pred_a[0])
    assert not torch.equal(enc_rank[0][:, :5], enc_a[0][:, :5])
    assert pred_step[0].shape != pred_a[0].shape or not torch.equal(pred_step[0], pred_a[0])
    assert pred_seed[0].shape != pred_a[0].shape or not torch.equal(pred_seed[0], pred_a[0])
    # rank from the constructor is the default
    enc_c, pred_c = official(rank=1).sample(32, step=7)
    assert torch.equal(pred_c[0], pred_a[0]) and torch.equal(enc_c[0], enc_a[0])


def test_block_sizes_follow_seed_and_step_only():
    sizes = {official(seed=3, rank=r).block_sizes(11) for r in range(4)}
    assert len(sizes) == 1
    assert len({official().block_sizes(s) for s in range(30)}) > 3
    assert [official(seed=1).block_sizes(s) for s in range(30)] != [official().block_sizes(s) for s in range(30)]


def test_legacy_block_sizes_match_official_seeding_for_seed_zero():
    # The official collator seeds a generator with the step and draws r_pred then r_enc.
    col = official(legacy_sampler=True)
    H = W = 16
    for step in range(50):
        g = torch.Generator()
        g.manual_seed(step)
        expected = []
        for (lo, hi), (alo, ahi) in [((0.15, 0.2), (0.75, 1.5)), ((0.85, 1.0), (1.0, 1.0))]:
            r = torch.rand(1, generator=g).item()
            keep = int(H * W * (lo + r * (hi - lo)))
            ar = alo + r * (ahi - alo)
            h, w = round(math.sqrt(keep * ar)), round(math.sqrt(keep / ar))
            expected.append((min(h, H - 1), min(w, W - 1)))
        assert col.block_sizes(step) == tuple(expected)


def test_state_dict_resumes_call_sequence():
    batch = [(torch.zeros(3, 4, 4), 0)] * 8
    col = official()
    outputs = [col(batch) for _ in range(5)]
    assert col.state_dict() == {"step": 5}

    resumed = official()
    resumed.load_state_dict({"step": 3})
    _, enc, pred = resumed(batch)
    assert all(torch.equal(x, y) for x, y in zip(enc + pred, outputs[3][1] + outputs[3][2]))
    assert resumed.state_dict() == {"step": 4}
    # consecutive calls use consecutive steps and match sample()
    enc_s, pred_s = official().sample(8, 4)
    _, enc, pred = resumed(batch)
    assert all(torch.equal(x, y) for x, y in zip(enc + pred, enc_s + pred_s))
    # official-style resume loop: step() consumes one step
    again = official()
    assert [again.step() for _ in range(3)] == [0, 1, 2]
    assert again.state_dict() == {"step": 3}


def test_pickle_and_deepcopy_keep_counter():
    col = official()
    col.load_state_dict({"step": 42})
    for clone in (copy.deepcopy(col), pickle.loads(pickle.dumps(col))):
        assert clone.state_dict() == {"step": 42}
        clone.step()
        assert clone.state_dict() == {"step": 43}
    assert col.state_dict() == {"step": 42}


def test_dataloader_workers_share_the_counter():
    data = [(torch.full((2,), float(i)), i) for i in range(24)]
    col = official(input_size=64, patch_size=16, min_keep=0)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, collate_fn=col)
    outputs = list(loader)
    assert len(outputs) == 6
    assert col.state_dict() == {"step": 6}
    # every batch got a distinct step: the set of masks equals sample() for steps 0..5
    got = sorted(tuple(torch.cat([m.flatten() for m in enc + pred]).tolist()) for _, enc, pred in outputs)
    want = sorted(
        tuple(torch.cat([m.flatten() for m in enc + pred]).tolist())
        for enc, pred in (official(input_size=64, patch_size=16, min_keep=0).sample(4, s) for s in range(6))
    )
    assert got == want


# --------------------------------------------------------------------------- fixed defects
def test_last_row_and_column_coverage():
    H = W = 16
    for legacy in (False, True):
        col = official(legacy_sampler=legacy)
        cov_pred = torch.zeros(H * W)
        cov_enc = torch.zeros(H * W)
        for step in range(40):
            masks_enc, masks_pred = col.sample(32, step)
            cov_pred += coverage(masks_pred, H * W)
            cov_enc += coverage(masks_enc, H * W)
        cov_pred, cov_enc = cov_pred.view(H, W), cov_enc.view(H, W)
        for cov in (cov_pred, cov_enc):
            last_row, last_col = cov[-1].sum().item(), cov[:, -1].sum().item()
            if legacy:
                assert last_row == 0 and last_col == 0
            else:
                assert last_row > 0 and last_col > 0
                assert cov[-1, -1] > 0


def test_full_grid_blocks_with_scale_one():
    kwargs = dict(enc_mask_scale=(1.0, 1.0), pred_mask_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0), min_keep=0)
    col = MultiBlockMaskCollator(input_size=64, patch_size=16, allow_overlap=True, **kwargs)
    assert col.block_sizes(0) == ((4, 4), (4, 4))
    masks_enc, masks_pred = col.sample(4, 0)
    assert torch.equal(masks_pred[0], torch.arange(16).expand(4, 16))
    assert torch.equal(masks_enc[0], torch.arange(16).expand(4, 16))

    legacy = MultiBlockMaskCollator(input_size=64, patch_size=16, legacy_sampler=True, allow_overlap=True, **kwargs)
    assert legacy.block_sizes(0) == ((3, 3), (3, 3))


def test_context_truncation_bias_fixed():
    H = W = 16
    ratios = {}
    for legacy in (False, True):
        col = official(legacy_sampler=legacy)
        cov = torch.zeros(H * W)
        for step in range(40):
            cov += coverage(col.sample(64, step)[0], H * W)
        cov = cov.view(H, W)
        top_left = cov[:7, :7].mean()
        # mirror image of the top-left region (legacy blocks live in the first 15x15 cells)
        bottom_right = cov[8:15, 8:15].mean() if legacy else cov[9:16, 9:16].mean()
        ratios[legacy] = (bottom_right / top_left).item()
    assert ratios[True] < 0.6  # raster-order truncation starves the bottom-right
    assert 0.85 < ratios[False] < 1.15


def test_mask_size_statistics():
    pred_sizes = [h * w for (h, w), _ in (official().block_sizes(s) for s in range(500))]
    assert 38 <= sum(pred_sizes) / len(pred_sizes) <= 51
    assert min(pred_sizes) >= 30 and max(pred_sizes) <= 56
    for legacy, (lo, hi) in ((True, (55, 85)), (False, (60, 100))):
        col = official(legacy_sampler=legacy)
        k_enc = [col.sample(128, s)[0][0].shape[1] for s in range(30)]
        mean = sum(k_enc) / len(k_enc)
        assert lo <= mean <= hi, (legacy, mean)
        assert min(k_enc) > 10


# --------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("input_size,patch_size", [(16, 16), (32, 16), (48, 16), (64, 16), ((112, 80), 16), ((32, 80), 16)])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("min_keep", [0, 4, 10_000])
def test_small_grids_and_impossible_min_keep_terminate(input_size, patch_size, legacy, min_keep):
    col = MultiBlockMaskCollator(
        input_size=input_size, patch_size=patch_size, enc_mask_scale=(0.2, 1.0), pred_mask_scale=(0.2, 1.0),
        nenc=2, npred=3, min_keep=min_keep, legacy_sampler=legacy,
    )
    n = col.height * col.width
    start = time.perf_counter()
    for step in range(10):
        masks_enc, masks_pred, info = col.sample_with_info(8, step)
        assert_valid_layout(masks_enc + masks_pred, 8, n)
        assert bool((info["context_lengths"] >= 1).all())
        assert torch.equal(info["fallback"], info["context_lengths"] <= min_keep)
    assert time.perf_counter() - start < 2.0
    if min_keep == 10_000:
        assert col.num_fallback == 10 * 8 * 2


def test_call_collates_batch():
    batch = [(torch.full((3, 32, 32), float(i)), i) for i in range(6)]
    col = MultiBlockMaskCollator(input_size=32, patch_size=8, npred=2, nenc=1)
    (images, labels), masks_enc, masks_pred = col(batch)
    assert images.shape == (6, 3, 32, 32)
    assert torch.equal(images[:, 0, 0, 0], torch.arange(6).float())
    assert torch.equal(labels, torch.arange(6))
    assert len(masks_enc) == 1 and len(masks_pred) == 2
    assert_valid_layout(masks_enc + masks_pred, 6, 16)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(enc_mask_scale=(0.0, 0.5)), "enc_mask_scale"),
        (dict(enc_mask_scale=(0.5, 1.2)), "enc_mask_scale"),
        (dict(pred_mask_scale=(0.3, 0.2)), "pred_mask_scale"),
        (dict(pred_mask_scale=0.2), "pred_mask_scale"),
        (dict(aspect_ratio=(-1.0, 2.0)), "aspect_ratio"),
        (dict(aspect_ratio=(2.0, 1.0)), "aspect_ratio"),
        (dict(npred=0), "npred"),
        (dict(nenc=0), "nenc"),
        (dict(min_keep=-1), "min_keep"),
        (dict(patch_size=0), "patch_size"),
        (dict(input_size=16, patch_size=32), "patch_size"),
        (dict(input_size=(224,)), "input_size"),
        (dict(input_size=(0, 224)), "input_size"),
        (dict(rank=-1), "rank"),
        (dict(legacy_sampler="yes"), "legacy_sampler"),
        (dict(allow_overlap=1), "allow_overlap"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MultiBlockMaskCollator(**kwargs)


def test_bad_sample_arguments_raise():
    col = official()
    with pytest.raises(ValueError, match="batch_size"):
        col.sample(0, 0)
    with pytest.raises(ValueError, match="step"):
        col.sample(4, -1)
    with pytest.raises(ValueError, match="step"):
        col.load_state_dict({"step": -3})
