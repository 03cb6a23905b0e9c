"""Token gathering helpers shared by the encoder, the predictor and the training loss.

Both functions keep the batch layout of the official I-JEPA code, so tensors produced here
line up element for element with tensors produced there.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _as_mask_list(masks: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(masks, torch.Tensor):
        return [masks]
    masks = list(masks)
    if not masks:
        raise ValueError("masks must be a LongTensor [B, K] or a non-empty list of them")
    return masks


def apply_masks(x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Keep the tokens listed in each mask and stack the results along the batch dim.

    Args:
        x: tokens, shape [B, N, D].
        masks: one LongTensor [B, K] of token indices into N, or a list of them (all with
            the same K).

    Returns:
        [len(masks) * B, K, D]; rows ``i*B:(i+1)*B`` hold the tokens selected by ``masks[i]``.
    """
    if x.dim() != 3:
        raise ValueError(f"apply_masks expects x of shape [B, N, D], got {tuple(x.shape)}")
    batch, _, dim = x.shape
    gathered = []
    for mask in _as_mask_list(masks):
        if mask.dim() != 2 or mask.shape[0] != batch:
            raise ValueError(
                f"each mask must have shape [B={batch}, K], got {tuple(mask.shape)}"
            )
        index = mask.to(device=x.device, dtype=torch.long).unsqueeze(-1).expand(-1, -1, dim)
        gathered.append(torch.gather(x, dim=1, index=index))
    return torch.cat(gathered, dim=0)


def repeat_interleave_batch(x: torch.Tensor, B: int, repeat: int) -> torch.Tensor:
    """Repeat every consecutive chunk of ``B`` rows ``repeat`` times, chunk by chunk.

    With ``x`` made of chunks ``[c0, c1, ...]`` (each ``B`` rows) the result is
    ``[c0]*repeat + [c1]*repeat + ...``. This pairs target features (one chunk per target
    mask) with predictor outputs computed for ``repeat`` context masks.
    """
    if B <= 0 or repeat <= 0:
        raise ValueError(f"B and repeat must be positive, got B={B}, repeat={repeat}")
    if x.shape[0] % B != 0:
        raise ValueError(f"leading dim {x.shape[0]} is not a multiple of B={B}")
    chunks = x.shape[0] // B
    rest = x.shape[1:]
    out = x.reshape(chunks, 1, B, *rest).expand(chunks, repeat, B, *rest)
    return out.reshape(chunks * repeat * B, *rest)
