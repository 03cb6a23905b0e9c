"""Command-line front ends: one module per ijepa-scale command (argparse, exit codes); the work is done in the library."""
