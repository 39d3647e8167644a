"""Train a captioner: `accelerate launch launch/train.py --config configs/demo.yaml [key=value ...]`.

Also runs under torchrun and plain python."""
import argparse

from imcap.config import load_config
from imcap.train import train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="a YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=3e-4")
    args = parser.parse_args()
    train(load_config(args.config, args.overrides))
