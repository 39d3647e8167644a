"""The `imcap` command: thin subcommands that parse arguments and call the library."""
from __future__ import annotations

import argparse
import sys

from imcap.config import ConfigError, load_config


def cmd_train(args) -> None:
    from imcap.train import train

    train(load_config(args.config, args.overrides))


def cmd_demo(args) -> None:
    from imcap.data.demo import build_demo

    out = build_demo(args.out, train_images=args.train_images, val_images=args.val_images)
    print(f"demo shards in {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imcap", description="Train and use Show, Attend and Tell captioners.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train as a config says (for several processes use `accelerate launch launch/train.py`)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="write the synthetic demo dataset as shards")
    p.add_argument("--out", default="shards/demo")
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--val-images", type=int, default=500)
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"imcap: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
