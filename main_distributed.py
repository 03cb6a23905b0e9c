"""SLURM launcher (submitit), compatible with the official I-JEPA main_distributed.py.

    python main_distributed.py --fname configs/in1k_vith14_ep300.yaml --folder logs/submitit \
        --partition PART --nodes 2 --tasks-per-node 8 --time 1000 [section.key=value ...]
    python main_distributed.py --fname configs/tiny.yaml --preset local-cpu --tasks-per-node 2 --dry-run

The job requeues itself after a time-limit warning or a preemption, once a checkpoint of the
step it stopped at is committed; see `python main_distributed.py --help` and the README.
"""

import sys

from ijepa_scale.commands.slurm import main

if __name__ == "__main__":
    sys.exit(main(prog="main_distributed.py"))
