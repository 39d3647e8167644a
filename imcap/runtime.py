"""A training process's surroundings: the Accelerator, its CPU threads, logging, the run directory."""

from __future__ import annotations

import logging
import os

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from imcap.config import Config, save_config, to_dict


def start_process(cfg: Config) -> Accelerator:
    """The Accelerator of this process, with its CPU threads and logging set, and seeded: the same initial
    weights on every process."""
    acc = Accelerator(
        cpu=cfg.train.cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with="tensorboard",
        project_dir=str(cfg.run_dir),
        step_scheduler_with_optimizer=False,
    )
    if acc.device.type == "cpu":
        set_cpu_threads(cfg, acc.num_processes)
    setup_logging(acc.is_main_process)
    set_seed(cfg.train.seed)
    return acc


def available_cores() -> int:
    """The cores this process may run on (its affinity where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_cpu_threads(cfg: Config, num_processes: int) -> None:
    """train.cpu_threads, or this process's share of the node's cores less its data workers, which decode
    beside it (accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise)."""
    share = available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    torch.set_num_threads(cfg.train.cpu_threads or max(1, share - cfg.data.num_workers))


def setup_logging(main_process: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )


def prepare_run_dir(cfg: Config, acc: Accelerator) -> None:
    """runs/<name>/ with the resolved config.yaml in it, the config also printed (main process)."""
    if acc.is_main_process:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
        print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
