"""Local launcher, compatible with the official I-JEPA main.py.

    python main.py --fname configs/in1k_vith14_ep300.yaml --devices cuda:0 cuda:1 [section.key=value ...]
    python main.py --fname configs/demo_fmnist_vit.yaml --devices cpu cpu
    torchrun --nproc_per_node=8 main.py --fname configs/X.yaml
"""

import argparse
import sys

from ijepa_scale.config import ConfigError, load_config
from ijepa_scale.launch import launch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="I-JEPA pretraining on local devices")
    parser.add_argument("--fname", type=str, default="configs.yaml", help="YAML config file")
    parser.add_argument("--devices", type=str, nargs="+", default=None,
                        help="one rank per device, e.g. cuda:0 cuda:1 or cpu cpu (default cuda:0)")
    parser.add_argument("overrides", nargs="*", help="config overrides such as optimization.epochs=2")
    args = parser.parse_args(argv)
    if args.devices:
        # `--devices cpu cpu data.batch_size=8`: argparse gives the overrides to --devices.
        args.overrides = [d for d in args.devices if "=" in d] + args.overrides
        args.devices = [d for d in args.devices if "=" not in d]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.fname, args.overrides)
        return launch(cfg, args.devices)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
