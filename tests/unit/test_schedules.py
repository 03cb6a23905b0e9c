import math

import pytest

from ijepa_scale.config import OptimizationConfig
from ijepa_scale.schedules import CosineWD, LinearMomentum, WarmupCosineLR, build_schedules


def official_lr(step, warmup, start, ref, final, total):
    # Formula of the official WarmupCosineSchedule, written out independently.
    if step < warmup:
        return start + step / max(1, warmup) * (ref - start)
    progress = (step - warmup) / max(1, total - warmup)
    return max(final, final + (ref - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_lr_matches_official_formula_and_is_stepped_before_use():
    sched = WarmupCosineLR(warmup_steps=10, start_lr=2e-4, ref_lr=1e-3, total_steps=100, final_lr=1e-6)
    values = [sched.step() for _ in range(100)]
    expected = [official_lr(s, 10, 2e-4, 1e-3, 1e-6, 100) for s in range(1, 101)]
    assert values == expected
    assert values[9] == pytest.approx(1e-3) and values[-1] == pytest.approx(1e-6)


def test_wd_rises_from_ref_to_final():
    sched = CosineWD(ref_wd=0.04, total_steps=50, final_wd=0.4)
    values = [sched.step() for _ in range(50)]
    assert values[0] > 0.04 and values[0] < 0.041
    assert values[-1] == pytest.approx(0.4)
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_momentum_linear_and_saturates_instead_of_stop_iteration():
    sched = LinearMomentum(0.996, 1.0, total_steps=4)
    values = [sched.step() for _ in range(7)]
    assert values[:5] == pytest.approx([0.996, 0.997, 0.998, 0.999, 1.0])
    assert values[5:] == [1.0, 1.0]


def test_state_dict_resumes_exactly():
    cfg = OptimizationConfig(epochs=3, warmup=1, lr=1e-3, start_lr=1e-4, final_lr=1e-6)
    full = build_schedules(cfg, steps_per_epoch=7)
    part = build_schedules(cfg, steps_per_epoch=7)
    for _ in range(9):
        for a, b in zip(full, part):
            assert a.step() == b.step()
    resumed = build_schedules(cfg, steps_per_epoch=7)
    for r, p in zip(resumed, part):
        r.load_state_dict(p.state_dict())
    for _ in range(15):
        for a, r in zip(full, resumed):
            assert a.step() == r.step()


def test_build_schedules_uses_ipe_scale_and_warmup_epochs():
    cfg = OptimizationConfig(epochs=10, warmup=2, ipe_scale=1.25)
    lr, wd, momentum = build_schedules(cfg, steps_per_epoch=100)
    assert lr.warmup_steps == 200 and lr.cosine_steps == 1250 - 200
    assert wd.total_steps == 1250 and momentum.total_steps == 1250
