"""Evaluate a model on a split: `accelerate launch launch/evaluate.py RUN_OR_CHECKPOINT --split val`.

Each process decodes its share of the split; the scores and captions are written once."""

from imcap.cli import main

if __name__ == "__main__":
    import sys

    sys.exit(main(["eval", *sys.argv[1:]]))
