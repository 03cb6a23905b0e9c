"""Energy transformer: one recurrent block whose tokens descend the gradient of an energy.

With g = LN(x) (learnable LayerNorm), the energy of a sequence is

    E(g) = - sum_h (1/beta_h) sum_A logsumexp_B(beta_h <Wq_h g_A, Wk_h g_B>)          (attention)
           - 1/2 sum_A sum_mu relu(b (g_A^T W)_mu)^2                                    (Hopfield, relu)
        or - (1/b) sum_A logsumexp_mu(b (g_A^T W)_mu)                                   (Hopfield, softmax)

summed over the batch, and each of ``steps`` iterations (weights shared) does x <- x - alpha * dE/dg.
There is no value/output projection, no MLP and no final norm. The gradient is taken by autograd with
``create_graph`` whenever the caller records gradients (training then differentiates a gradient:
second order, memory ~ steps), or from its closed form (``gradient="analytic"``: the same function
with a first-order graph). Where no gradient is recorded (no_grad, inference_mode) both use the closed form.

:class:`EnergyTransformer` and :class:`EnergyPredictor` take the same arguments as the ViT encoder and
predictor (``encoder(images, masks)``, ``predictor(z, masks_x, masks)``) and return the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .utils import apply_masks, repeat_interleave_batch
from .vision_transformer import LAYER_NORM_EPS, MaskArg, PatchEmbed, _normalise_img_size, get_2d_sincos_pos_embed

HOPFIELD_KINDS = ("relu", "softmax")
GRADIENTS = ("autograd", "analytic")
MODEL_NAME = "energy_transformer"
DEFAULT_EMBED_DIM, DEFAULT_NUM_HEADS = 256, 8  # EnergyIJepa's sizes when meta.embed_dim/num_heads are unset


@dataclass
class EnergyConfig:
    """The `energy` config section: used when meta.model_name is energy_transformer (widths and head count
    still come from meta.embed_dim, meta.num_heads and meta.pred_emb_dim)."""

    SECTION = "energy"

    steps: int = 6
    """Energy-descent iterations of the encoder's one shared block (the analogue of depth)."""
    pred_steps: Optional[int] = None
    """Iterations of the predictor's block (default: steps); meta.pred_depth is not used."""
    alpha: float = 0.1
    """Step size of each descent iteration: x <- x - alpha * dE/dg."""
    hidden_dim: Optional[int] = None
    """Hopfield memories of the encoder's block (default 8 x meta.embed_dim)."""
    pred_hidden_dim: Optional[int] = None
    """Hopfield memories of the predictor's block (default 8 x meta.pred_emb_dim)."""
    head_dim: Optional[int] = None
    """Query/key size per head (default width / num_heads)."""
    hopfield: str = "relu"
    """Hopfield energy: relu (-1/2 sum relu(b g.W)^2) or softmax (-(1/b) logsumexp(b g.W))."""
    gradient: str = "autograd"
    """How dE/dg is taken: autograd (create_graph; training is second order) or analytic (its closed form)."""

    def validate(self) -> None:
        for name in ("steps", "pred_steps", "hidden_dim", "pred_hidden_dim", "head_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"energy.{name}={value} must be > 0")
        if not self.alpha > 0:
            raise ConfigError(f"energy.alpha={self.alpha} must be > 0")
        for name, choices in (("hopfield", HOPFIELD_KINDS), ("gradient", GRADIENTS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"energy.{name}={getattr(self, name)!r} must be one of {', '.join(choices)}")

    def validate_with(self, meta, distributed) -> None:
        """Checks against the meta section when meta.model_name is energy_transformer."""
        if meta.depth is not None:
            raise ConfigError(f"meta.depth={meta.depth} does not apply to {MODEL_NAME}: set energy.steps "
                              f"(iterations of its one shared block) and leave meta.depth unset")
        if distributed.compile and self.gradient == "autograd":
            raise ConfigError("distributed.compile=true cannot compile the second-order gradient of energy.gradient="
                              "autograd; set energy.gradient=analytic (the same function) or "
                              "distributed.compile=false")
        width = meta.embed_dim or DEFAULT_EMBED_DIM
        heads = meta.num_heads or DEFAULT_NUM_HEADS
        if self.head_dim is None:
            for key, dim in (("meta.embed_dim", width), ("meta.pred_emb_dim", meta.pred_emb_dim)):
                if dim % heads != 0:
                    raise ConfigError(f"{key}={dim} is not divisible by meta.num_heads={heads}; change one or "
                                      f"set energy.head_dim")


class EnergyBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, head_dim: int | None = None, hidden_dim: int | None = None,
                 hopfield: str = "relu", init_std: float = 0.002):
        super().__init__()
        if hopfield not in HOPFIELD_KINDS:
            raise ValueError(f"hopfield={hopfield!r} is not one of {', '.join(HOPFIELD_KINDS)}")
        head_dim = head_dim or dim // num_heads
        hidden_dim = hidden_dim or 8 * dim
        self.hopfield = hopfield
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.wq = nn.Parameter(torch.randn(num_heads, head_dim, dim) * init_std)
        self.wk = nn.Parameter(torch.randn(num_heads, head_dim, dim) * init_std)
        self.betas = nn.Parameter(torch.full((num_heads,), 1.0 / math.sqrt(head_dim)))
        self.memories = nn.Parameter(torch.randn(dim, hidden_dim) * init_std)
        # Shape [1], not a scalar: FSDP2 shards along dim 0, and the optimizer's no-decay group takes 1-D tensors.
        self.hopfield_beta = nn.Parameter(torch.full((1,), 1.0 if hopfield == "relu" else 0.01))

    def _scores(self, g: torch.Tensor):
        q = torch.einsum("bld,hed->bhle", g, self.wq)
        k = torch.einsum("bld,hed->bhle", g, self.wk)
        return q, k, torch.einsum("bhle,bhme->bhlm", q, k) * self.betas.view(1, -1, 1, 1)

    def energy(self, g: torch.Tensor) -> torch.Tensor:
        """E of layer-normed tokens g [B, L, D], summed over the batch (a scalar)."""
        _, _, scores = self._scores(g)
        attention = -(torch.logsumexp(scores, dim=-1).sum(dim=(0, 2)) / self.betas).sum()
        hidden = self.hopfield_beta * (g @ self.memories)
        if self.hopfield == "relu":
            hopfield = -0.5 * torch.relu(hidden).pow(2).sum()
        else:
            hopfield = -(torch.logsumexp(hidden, dim=-1).sum() / self.hopfield_beta)
        return (attention + hopfield).sum()

    def energy_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """dE/dg in closed form: -sum_h (P Wq-side + P^T Wk-side) minus the Hopfield term."""
        q, k, scores = self._scores(g)
        p = torch.softmax(scores, dim=-1)
        from_queries = torch.einsum("bhle,hed->bld", torch.einsum("bhlm,bhme->bhle", p, k), self.wq)
        from_keys = torch.einsum("bhme,hed->bmd", torch.einsum("bhlm,bhle->bhme", p, q), self.wk)
        hidden = self.hopfield_beta * (g @ self.memories)
        if self.hopfield == "relu":
            hopfield = self.hopfield_beta * torch.relu(hidden)
        else:
            hopfield = torch.softmax(hidden, dim=-1)
        return -(from_queries + from_keys) - hopfield @ self.memories.T

    def autograd_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """dE/dg by autograd with create_graph, so training differentiates through it (second order).
        Where nothing records gradients (no_grad: the target encoder, evaluation; inference_mode, which
        cannot run autograd at all; a frozen block on a constant input) the closed form, the same function,
        is used instead: no graph is built or kept, and it is faster than building one to take its gradient."""
        if not (torch.is_grad_enabled() and (g.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return self.energy_gradient(g)
        if not g.requires_grad:  # a constant input to a trained block: dE/dg still depends on the weights
            g = g.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.energy(g), g, create_graph=True)
        return grad

    def forward(self, x: torch.Tensor, steps: int, alpha: float, gradient: str = "autograd") -> torch.Tensor:
        for _ in range(steps):
            g = self.norm(x)
            grad = self.autograd_gradient(g) if gradient == "autograd" else self.energy_gradient(g)
            x = x - alpha * grad
        return x


class EnergyTransformer(nn.Module):
    """Encoder: patch embedding + learnable positions (sin-cos initialised), then ``steps`` energy-descent
    iterations of one shared block. Output [len(masks) * B, K, D] like ``VisionTransformer``."""

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 256, num_heads: int = 8, head_dim: int | None = None, hidden_dim: int = 2048,
                 steps: int = 6, alpha: float = 0.1, hopfield: str = "relu", gradient: str = "autograd"):
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient={gradient!r} is not one of {', '.join(GRADIENTS)}")
        img_size = _normalise_img_size(img_size)
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads, self.steps, self.alpha, self.gradient = num_heads, steps, alpha, gradient
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(embed_dim, img_size // patch_size).unsqueeze(0))
        self.block = EnergyBlock(embed_dim, num_heads, head_dim, hidden_dim, hopfield)
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, x: torch.Tensor, masks: MaskArg = None) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        if masks is not None:
            x = apply_masks(x, masks)
        return self.block(x, self.steps, self.alpha, self.gradient)


class EnergyPredictor(nn.Module):
    """I-JEPA predictor on the energy block: project context tokens to the predictor width, add their
    positions, append a mask token plus position per target token, descend the energy, then norm and
    project the target tokens back. Arguments and output as ``VisionTransformerPredictor``."""

    def __init__(self, num_patches: int, embed_dim: int = 256, predictor_embed_dim: int = 256,
                 num_heads: int = 8, head_dim: int | None = None, hidden_dim: int = 2048, steps: int = 6,
                 alpha: float = 0.1, hopfield: str = "relu", gradient: str = "autograd"):
        super().__init__()
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient={gradient!r} is not one of {', '.join(GRADIENTS)}")
        self.num_patches, self.steps, self.alpha, self.gradient = num_patches, steps, alpha, gradient
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        side = math.isqrt(num_patches)
        self.predictor_pos_embed = nn.Parameter(get_2d_sincos_pos_embed(predictor_embed_dim, side).unsqueeze(0))
        self.block = EnergyBlock(predictor_embed_dim, num_heads, head_dim, hidden_dim, hopfield)
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        for linear in (self.predictor_embed, self.predictor_proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, masks_x, masks) -> torch.Tensor:
        masks_x = [masks_x] if isinstance(masks_x, torch.Tensor) else list(masks_x)
        masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
        nenc, npred = len(masks_x), len(masks)
        batch = x.shape[0] // nenc
        pos = self.predictor_pos_embed.expand(batch, -1, -1)
        ctx = self.predictor_embed(x) + apply_masks(pos, masks_x)
        queries = repeat_interleave_batch(apply_masks(pos, masks), batch, repeat=nenc) + self.mask_token
        tokens = torch.cat([ctx.repeat(npred, 1, 1), queries], dim=1)
        tokens = self.block(tokens, self.steps, self.alpha, self.gradient)
        return self.predictor_proj(self.predictor_norm(tokens[:, ctx.shape[1]:]))


def build_energy_encoder(img_size: int | Sequence[int], patch_size: int, embed_dim: Optional[int] = None,
                         num_heads: Optional[int] = None, energy: Optional[EnergyConfig] = None) -> EnergyTransformer:
    """The encoder of meta.model_name=energy_transformer: width and heads from meta, the rest from `energy`."""
    energy = energy or EnergyConfig()
    embed_dim = embed_dim or DEFAULT_EMBED_DIM
    return EnergyTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                             num_heads=num_heads or DEFAULT_NUM_HEADS, head_dim=energy.head_dim,
                             hidden_dim=energy.hidden_dim or 8 * embed_dim, steps=energy.steps, alpha=energy.alpha,
                             hopfield=energy.hopfield, gradient=energy.gradient)


def build_energy_predictor(encoder: EnergyTransformer, pred_emb_dim: int,
                           energy: Optional[EnergyConfig] = None) -> EnergyPredictor:
    """Its predictor: width meta.pred_emb_dim, the encoder's head count, energy.pred_steps iterations."""
    energy = energy or EnergyConfig()
    return EnergyPredictor(encoder.num_patches, embed_dim=encoder.embed_dim, predictor_embed_dim=pred_emb_dim,
                           num_heads=encoder.num_heads, head_dim=energy.head_dim,
                           hidden_dim=energy.pred_hidden_dim or 8 * pred_emb_dim,
                           steps=energy.pred_steps or energy.steps, alpha=energy.alpha, hopfield=energy.hopfield,
                           gradient=energy.gradient)
