"""Released weights: the registry and a verified download cache, the official and Hugging Face formats,
loading (``load_*``) and export.

Modules import downwards only: ``registry``, ``official`` and ``hf`` (formats, no loading) at the bottom;
``download`` over ``registry``; ``load`` over those; ``export`` on top.
"""

from .download import fetch
from .load import load_checkpoint, load_encoder, load_predictor, load_pretrained

__all__ = ["fetch", "load_checkpoint", "load_encoder", "load_predictor", "load_pretrained"]
