"""The released I-JEPA checkpoints: their names, files and URLs (``$IJEPA_SCALE_MIRROR`` replaces the host)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

MIRROR_ENV_VAR = "IJEPA_SCALE_MIRROR"
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/ijepa"


@dataclass(frozen=True)
class Release:
    name: str  # as the Hugging Face hub names the same weights (facebook/NAME)
    file: str
    arch: str
    patch: int
    resolution: int
    data: str
    epochs: int
    aliases: tuple = ()
    evaluated: str = "target_encoder"  # the paper evaluates the target encoder, average-pooled

    @property
    def url(self) -> str:
        base = os.environ.get(MIRROR_ENV_VAR) or OFFICIAL_BASE_URL
        return f"{base.rstrip('/')}/{self.file}"


# The IN-22K file names say 900e/600e while their configs train 66/44 epochs; the epochs here are
# the configs'. HF's ports of these files were converted from the context encoder ("encoder").
RELEASES = (
    Release("ijepa_vith14_1k", "IN1K-vit.h.14-300e.pth.tar", "vit_huge", 14, 224, "ImageNet-1K", 300,
            aliases=("vit_huge_14_224_in1k",)),
    Release("ijepa_vith16_1k", "IN1K-vit.h.16-448px-300e.pth.tar", "vit_huge", 16, 448, "ImageNet-1K", 300,
            aliases=("vit_huge_16_448_in1k",)),
    Release("ijepa_vith14_22k", "IN22K-vit.h.14-900e.pth.tar", "vit_huge", 14, 224, "ImageNet-22K", 66,
            aliases=("vit_huge_14_224_in22k",)),
    Release("ijepa_vitg16_22k", "IN22K-vit.g.16-600e.pth.tar", "vit_giant", 16, 224, "ImageNet-22K", 44,
            aliases=("vit_giant_16_224_in22k",)),
)


def find_release(name: str) -> Optional[Release]:
    key = name.strip().lower().removeprefix("facebook/")
    return next((r for r in RELEASES if key == r.name or key in r.aliases), None)


def registry_table() -> str:
    header = ("name", "arch", "patch", "res", "data", "epochs", "paper evaluates", "url")
    rows = [(r.name, r.arch, str(r.patch), str(r.resolution), r.data, str(r.epochs), r.evaluated, r.url)
            for r in RELEASES]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def is_url(source: str) -> bool:
    return "://" in source


def resolve_source(source: str) -> str:
    """A registry name becomes its URL; anything else is returned as given."""
    release = find_release(source) if not is_url(source) and not os.path.exists(source) else None
    return release.url if release else source
