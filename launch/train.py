"""Train a captioner: `accelerate launch launch/train.py --config configs/demo.yaml [key=value ...]`.

Also runs under torchrun and plain python; the same as `imcap train`, exit codes included (75: preempted
after saving a checkpoint; 2: a bad config or input, reported in one line `imcap: ...`)."""

import sys

from imcap.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
