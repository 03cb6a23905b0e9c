"""ijepa-scale: a launcher and pipeline for large-scale I-JEPA pretraining."""

__version__ = "0.1.0"
