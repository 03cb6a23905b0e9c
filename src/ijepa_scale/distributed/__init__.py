"""Process groups, DDP/FSDP wrapping, precision, activation checkpointing and compile: the only place."""
