"""The checks of a loaded configuration beyond each value's type: ranges, and settings that need each other.

Each check is a condition and the message, naming the key, of a config that fails it; `config_problems`
returns the messages of every failed check, and `imcap.config.validate` raises the first as a ConfigError.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imcap.config import Config

SEEDS = 2**32  # accelerate's set_seed seeds numpy too, which takes 0 <= seed < 2**32
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def config_problems(cfg: Config) -> list[str]:
    """The message of every check the config fails, in the order of the checks; empty: it is valid."""
    preemption_signal = getattr(signal, cfg.train.preemption_signal, None)  # SIG_IGN is a handler, not a signal
    scst = cfg.train.objective == "scst"  # the scst section matters only then
    checks = [
        (
            cfg.run_name not in ("", ".", "..") and not any(sep and sep in cfg.run_name for sep in (os.sep, os.altsep)),
            f"run_name must name one directory inside runs_dir (not empty, . or .., no {os.sep}); got {cfg.run_name!r}",
        ),
        (
            0 <= cfg.train.seed < SEEDS,
            f"train.seed must be in [0, 2**32), the seeds numpy accepts; got {cfg.train.seed}",
        ),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.captions_per_image >= 1, "data.captions_per_image must be >= 1"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0"),
        (cfg.data.read_attempts >= 1, "data.read_attempts must be >= 1"),
        (cfg.train.cpu_threads >= 0, "train.cpu_threads must be >= 0"),
        (cfg.data.image_size >= 32, "data.image_size must be >= 32 (ResNet-50 downsamples by 32)"),
        (
            not (cfg.data.feature_cache and cfg.data.train_crop == "random"),
            "data.feature_cache needs data.train_crop=center: a random crop changes the features every epoch",
        ),
        (cfg.text.min_word_count >= 1, "text.min_word_count must be >= 1"),
        (cfg.text.max_length >= 1, "text.max_length must be >= 1"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.layer4_lr > 0, "train.layer4_lr must be > 0"),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (cfg.train.clip_grad_norm > 0, "train.clip_grad_norm must be > 0"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
        (0.0 <= cfg.model.decoder.dropout < 1.0, "model.decoder.dropout must be in [0, 1)"),
        (cfg.model.encoder.batchnorm_stats_images >= 0, "model.encoder.batchnorm_stats_images must be >= 0"),
        (cfg.model.encoder.feature_stats_images >= 0, "model.encoder.feature_stats_images must be >= 0"),
        (cfg.eval.max_length >= 1, "eval.max_length must be >= 1"),
        (cfg.eval.beam_size >= 1, "eval.beam_size must be >= 1"),
        (cfg.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (cfg.eval.max_images >= 0, "eval.max_images must be >= 0"),
        (cfg.eval.tensorboard_samples >= 0, "eval.tensorboard_samples must be >= 0"),
        (cfg.eval.every_steps >= 0, "eval.every_steps must be >= 0"),
        (cfg.eval.no_repeat_ngram >= 0, "eval.no_repeat_ngram must be >= 0"),
        (not scst or cfg.scst.samples_per_image >= 1, "scst.samples_per_image must be >= 1"),
        (
            not scst or cfg.scst.baseline != "mean" or cfg.scst.samples_per_image >= 2,
            "scst.baseline=mean needs scst.samples_per_image >= 2: it is the mean reward of an image's other samples",
        ),
        (not scst or cfg.scst.temperature > 0, "scst.temperature must be > 0"),
        (not scst or cfg.scst.max_length >= 1, "scst.max_length must be >= 1"),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (
            cfg.checkpoint.best_metric in (*METRICS, "val_loss"),
            f"checkpoint.best_metric must be one of {', '.join((*METRICS, 'val_loss'))}",
        ),
        (
            cfg.checkpoint.best_metric != "meteor" or cfg.eval.meteor == "every",
            "checkpoint.best_metric=meteor needs eval.meteor=every: other evaluations do not compute it",
        ),
        (
            isinstance(preemption_signal, signal.Signals) and preemption_signal not in (signal.SIGKILL, signal.SIGSTOP),
            f"train.preemption_signal must name a signal that can be caught, e.g. SIGUSR1; "
            f"got {cfg.train.preemption_signal!r}",
        ),
    ]
    return [message for ok, message in checks if not ok]
