"""The `imcap` command: thin subcommands that parse arguments and call the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imcap.cli import shards
from imcap.config import ConfigError, load_config
from imcap.errors import EXIT_USER_ERROR, ImcapError, error_line


def cmd_train(args) -> None:
    from imcap.train import train

    train(load_config(args.config, args.overrides))


def cmd_demo(args) -> None:
    from imcap.data.demo import build_demo

    out = build_demo(args.out, train_images=args.train_images, val_images=args.val_images)
    print(f"demo shards in {out}")


def cmd_eval(args) -> None:
    from imcap.evaluation import evaluate_model

    out = args.out or str(Path(args.model) / f"eval-{args.split}")
    scores = evaluate_model(
        args.model,
        args.split,
        out,
        args.shards,
        args.cpu,
        beam_size=args.beam_size,
        max_images=args.max_images,
        batch_size=args.batch_size,
    )
    print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))


def cmd_caption(args) -> None:
    from imcap.caption import caption_files

    for path, caption in caption_files(args.model, args.images, args.beam_size, args.attention_maps, args.json):
        print(f"{path}: {caption}")


def cmd_features(args) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from imcap.data.feature_cache import cache_dir_for
    from imcap.data.shards import is_url
    from imcap.data.training_data import prepare_data
    from imcap.encoder_setup import build_feature_cache, estimate_batchnorm
    from imcap.model import Captioner

    cfg = load_config(args.config, args.overrides)
    if is_url(cfg.data.shards) and not args.out:
        raise ConfigError(
            f"data.shards={cfg.data.shards} is a URL, and the cache is written beside the shards unless --out "
            "says where: give --out DIR, a directory on a disk (one the nodes share, if several build it)"
        )
    acc = Accelerator(cpu=cfg.train.cpu, mixed_precision=cfg.train.mixed_precision)
    set_seed(cfg.train.seed)  # the encoder the trainer builds: `weights: none` from the same seed,
    data = prepare_data(cfg, acc)
    model = Captioner(cfg.model, len(data.vocab), data.vocab.pad)
    estimate_batchnorm(model, data, cfg, acc)  # with the same BatchNorm statistics
    out = Path(args.out or cache_dir_for(cfg.data.shards, model.encoder, cfg.data.image_size))
    cached = build_feature_cache(model, cfg, acc, out, args.batch_size, data.vocab, args.dtype)
    found = "" if args.out else " (or data.feature_cache=true, which finds it)"
    print(f"{cached} images cached in {out}; train from it with data.shards={out}{found}")


def cmd_export(args) -> None:
    from imcap.inference import export

    print(f"exported to {export(args.run, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    """Every `imcap` subcommand and its arguments."""
    from imcap.data import demo

    parser = argparse.ArgumentParser(prog="imcap", description="Train and use Show, Attend and Tell captioners.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train as a config says (for several processes use `accelerate launch launch/train.py`)"
    )
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="write the synthetic demo dataset as shards")
    p.add_argument("--out", default="shards/demo")
    p.add_argument("--train-images", type=int, default=demo.TRAIN_IMAGES)
    p.add_argument("--val-images", type=int, default=demo.VAL_IMAGES)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="score a run, checkpoint or export directory on a split")
    p.add_argument("model", help="a run directory (its best checkpoint), a checkpoint or an export directory")
    p.add_argument("--split", default="val")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--out", default=None, help="where captions.json and scores.json go (default: MODEL/eval-SPLIT)")
    p.add_argument("--shards", default=None, help="read the split from these shards instead of the model's")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("caption", help="caption image files and directories")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="a run, checkpoint or export directory")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--attention-maps", default=None, metavar="DIR", help="write one PNG per image here")
    p.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write one JSON object per image here (JSON Lines): file, caption, words, attention "
        "(per word, the weight of each region, row by row) and grid ([rows, columns])",
    )
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("features", help="the frozen-feature cache")
    p = p.add_subparsers(dest="features_command", required=True).add_parser(
        "build", help="run the frozen part of a config's encoder once over its shards and cache the output"
    )
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted key=value")
    p.add_argument(
        "--out",
        default=None,
        help="default: <data.shards>/features/<digest of the frozen weights>; needed when data.shards is a URL",
    )
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("export", help="weights (safetensors), vocabulary and config for inference")
    p.add_argument("run", help="a run directory (its best checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    shards.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `imcap` command -> its exit status: 0, a command's own result (`shards check`: 1 for problems
    found), EXIT_USER_ERROR for an ImcapError, printed as one line, or EXIT_PREEMPTED."""
    from imcap.distributed import EXIT_PREEMPTED, Preempted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ImcapError as e:
        # every rank of a launch prints its own: the launcher may stop the others before they print theirs
        print(error_line(e, int(os.environ.get("RANK", "0"))), file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as e:
        print(f"imcap: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C: the first one's save did not finish, `latest` is the one before
        print("imcap: interrupted by a second Ctrl-C; the last complete checkpoint is kept", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it


if __name__ == "__main__":
    sys.exit(main())
