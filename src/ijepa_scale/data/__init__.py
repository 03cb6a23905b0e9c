"""Data pipeline: tar shards, their writers, and image transforms."""
