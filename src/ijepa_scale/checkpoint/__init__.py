"""Checkpoints: files and retention, DCP folders, safe reading, the manager the trainer calls."""
