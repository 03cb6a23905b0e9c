"""Deprecated home of the loaders: use :mod:`ijepa_scale.weights` (``from ijepa_scale.weights import load_encoder``)."""

import warnings

from .weights import fetch, load_checkpoint, load_encoder, load_predictor, load_pretrained

__all__ = ["fetch", "load_checkpoint", "load_encoder", "load_predictor", "load_pretrained"]

warnings.warn("ijepa_scale.pretrained is deprecated; import from ijepa_scale.weights", DeprecationWarning, stacklevel=2)
