import pytest
import torch

from ijepa_scale.config import ConfigError, config_from_dict
from ijepa_scale.models import build_encoder
from ijepa_scale.distributed.parallel import ParallelPlan, ema_update_, grad_norm_and_clip_, parallelize


def tiny_encoder():
    torch.manual_seed(0)
    return build_encoder("vit_tiny", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def test_parallel_settings_are_validated():
    with pytest.raises(ConfigError, match="distributed.parallel='zero'"):
        config_from_dict({"distributed": {"parallel": "zero"}, "data": {"shards": "x.tar"}})
    with pytest.raises(ConfigError, match="distributed.dtype=bfloat16"):
        config_from_dict({"distributed": {"parallel": "fsdp", "dtype": "float16"}, "data": {"shards": "x.tar"}})
    with pytest.raises(ConfigError, match="accum_steps"):
        config_from_dict({"distributed": {"accum_steps": 0}, "data": {"shards": "x.tar"}})
    with pytest.raises(ConfigError, match="distributed.target_dtype='fp32'"):
        config_from_dict({"distributed": {"target_dtype": "fp32"}, "data": {"shards": "x.tar"}})


def test_target_dtype_runs_the_frozen_network_in_its_own_precision():
    images = torch.randn(4, 3, 32, 32)
    cpu = torch.device("cpu")
    with torch.no_grad():
        reference = tiny_encoder()(images)  # float32
        plan = ParallelPlan(dtype="bfloat16", target_dtype="float32")
        online = parallelize(tiny_encoder(), cpu, plan)
        frozen = parallelize(tiny_encoder(), cpu, plan, trainable=False)
        same = parallelize(tiny_encoder(), cpu, ParallelPlan(dtype="bfloat16"), trainable=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            online_out, same_out, target = online(images), same(images), frozen(images)
        assert torch.equal(target, reference)  # exactly the float32 forward inside the step's autocast
        assert not torch.equal(online_out, reference) and not torch.equal(same_out, reference)
        assert list(frozen.state_dict()) == list(tiny_encoder().state_dict())
        # The other way round: a float32 step with bfloat16 targets.
        low = parallelize(tiny_encoder(), cpu, ParallelPlan(dtype="float32", target_dtype="bfloat16"),
                          trainable=False)
        assert not torch.equal(low(images), reference)
        assert torch.allclose(low(images), reference, atol=0.1)


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_parameter_names():
    images = torch.randn(4, 3, 32, 32)
    plain = tiny_encoder()
    checkpointed = parallelize(tiny_encoder(), torch.device("cpu"), ParallelPlan(activation_checkpointing=True))
    assert list(plain.state_dict()) == list(checkpointed.state_dict())
    for model in (plain, checkpointed):
        model(images).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name


def test_ema_update_is_the_official_formula():
    target, online = [torch.full((3,), 2.0)], [torch.full((3,), 4.0)]
    ema_update_(target, online, 0.75)
    assert torch.allclose(target[0], torch.full((3,), 0.75 * 2.0 + 0.25 * 4.0))


def test_grad_norm_and_clip():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = grad_norm_and_clip_(params, max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(torch.cat([p.grad for p in params]).norm()) == pytest.approx(1.0, rel=1e-5)
