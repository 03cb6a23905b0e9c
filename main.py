"""Local launcher, compatible with the official I-JEPA main.py.

    python main.py --fname configs/in1k_vith14_ep300.yaml --devices cuda:0 cuda:1 [section.key=value ...]
    python main.py --fname configs/demo_fmnist_vit_tiny.yaml --devices cpu cpu
    torchrun --nproc_per_node=8 main.py --fname configs/X.yaml
"""

import sys

from ijepa_scale.commands.train import main

if __name__ == "__main__":
    sys.exit(main(prog="main.py"))
