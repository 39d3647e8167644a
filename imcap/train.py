"""The training loop: `train(cfg)` reads top to bottom; the helpers below it are named for what they do.

A step is one optimizer step: `grad_accum_steps` micro-batches on every process, gradients averaged
across processes by DDP, clipped, then AdamW and the learning-rate schedule step once.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from imcap.caption import AttentionSamples
from imcap.checkpoint import Checkpointer, TrainState
from imcap.config import Config
from imcap.data.batch import Batch
from imcap.data.prefetch import DeviceBatches
from imcap.data.shards import list_shards
from imcap.data.streams import batches_per_epoch
from imcap.data.training_data import TrainingData, prepare_data
from imcap.distributed import Preempted, StopFlag, part_of
from imcap.encoder_setup import prepare_encoder
from imcap.evaluation import Evaluation, Evaluator
from imcap.metrics_log import MetricsLog
from imcap.model import Captioner
from imcap.objectives import make_objective
from imcap.resume import EpochReader, check_compatible, find_init, find_resume, load_checkpoint, load_weights
from imcap.run_dir import claim_run_dir
from imcap.runtime import prepare_run_dir, start_process


def train(cfg: Config) -> dict:
    """Train as configured -> the last evaluation's scores. Stopped by a signal: saves, raises Preempted."""
    # processes, the run directory, the data
    acc = start_process(cfg)
    claim_run_dir(cfg, acc)  # locked for this run, every place it writes checked: before any long work
    resume_from = find_resume(cfg, acc)
    init_from = find_init(cfg, acc, resume_from)
    stop = StopFlag(cfg.train.preemption_signal)
    prepare_run_dir(cfg, acc)
    data = prepare_data(cfg, acc)
    plan = EpochPlan.of(data, cfg, acc.num_processes)
    objective = make_objective(cfg, data, acc, resume_from)

    # the model and optimizer: restored, started from init_from's weights, or with the encoder's statistics
    # estimated; then the feature cache
    model = Captioner(cfg.model, len(data.vocab), data.vocab.pad)
    optimizer, scheduler = make_optimizer(model, cfg, plan.total_steps)
    state = restore(resume_from, init_from, model, optimizer, scheduler, objective, data, acc, plan)
    data = prepare_encoder(model, data, cfg, acc, fresh=not (resume_from or init_from), stop=stop)
    model, optimizer = prepare_model(model, optimizer, cfg, acc)
    evaluator = make_evaluator(data, cfg, acc)
    checkpointer = Checkpointer(cfg, acc, model, optimizer, scheduler, data.vocab, objective)

    # the loop: one optimizer step at a time through every epoch, on one loader
    acc.print(plan.describe(data, acc))
    loader = data.train_loader(part_of(acc), state, plan.epoch_batches)
    evaluation = None  # the last one
    with DeviceBatches(loader, acc.device) as batches, MetricsLog(cfg, acc, plan.total_steps, state.step) as metrics:
        while state.epoch < cfg.train.epochs:
            # step
            micro_batches = list(itertools.islice(batches, plan.micro_batches(state)))
            step_metrics = train_step(model, optimizer, scheduler, micro_batches, objective, cfg, acc)
            state.advance(micro_batches, plan.epoch_batches)
            # log
            metrics.after_step(state, step_metrics, micro_batches, scheduler.get_last_lr()[0])
            # evaluate
            if evaluator.due(state.step, epoch_ended=state.at_epoch_start, last=state.epoch == cfg.train.epochs):
                evaluation = evaluate(evaluator, model, state, metrics, cfg)
            # checkpoint; stopped by a signal, after this step's evaluation, which a resumed run does not repeat
            stopped_by = stop.agreed(acc)
            checkpointer.maybe_save(state, evaluation, stopping=stopped_by is not None)
            if stopped_by:
                acc.end_training()
                raise Preempted(stopped_by, state.step)
    if evaluation is None:  # resumed after the end: nothing was trained, report the model as it is
        evaluation = evaluate(evaluator, model, state, metrics, cfg)
    acc.end_training()
    return evaluation.scores


@dataclass(frozen=True)
class EpochPlan:
    """How an epoch divides into optimizer steps, on every process alike."""

    epoch_batches: int  # micro-batches per process and epoch: whole steps, no sample counted twice
    grad_accum_steps: int
    epochs: int

    @classmethod
    def of(cls, data: TrainingData, cfg: Config, world_size: int) -> EpochPlan:
        accum = cfg.train.grad_accum_steps
        return cls(
            batches_per_epoch(data.num_train_samples, cfg.data.batch_size, world_size, accum), accum, cfg.train.epochs
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_batches // self.grad_accum_steps

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def micro_batches(self, state: TrainState) -> int:
        """Never into the next epoch: resumed with another grad_accum_steps, an epoch's last step is short."""
        return min(self.grad_accum_steps, self.epoch_batches - state.batches_in_epoch)

    def describe(self, data: TrainingData, acc: Accelerator) -> str:
        threads = f" of {torch.get_num_threads()} CPU thread(s)" if acc.device.type == "cpu" else ""
        return (
            f"{data.num_train_samples} train images, {len(data.vocab)} words, {acc.num_processes} process(es)"
            f"{threads}, {self.steps_per_epoch} steps per epoch, {self.total_steps} steps"
        )


def train_step(
    model, optimizer, scheduler, micro_batches: list[Batch], objective, cfg: Config, acc: Accelerator
) -> dict[str, torch.Tensor]:
    """-> the objective's values, averaged over the micro-batches, and the gradient norm."""
    model.train()
    values = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else acc.no_sync(model):  # all-reduce gradients once per step
            loss, batch_values = objective(model, batch)
            acc.backward(loss / len(micro_batches))
        values.append(batch_values)
    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    averaged = {k: torch.stack([v[k].to(grad_norm.device) for v in values]).mean() for k in values[0]}
    return {**averaged, "grad_norm": grad_norm}


def make_optimizer(model: Captioner, cfg: Config, total_steps: int):
    """AdamW over the decoder and (when it trains) layer4, each at its learning rate, and its schedule."""
    lrs = {"decoder": cfg.train.lr, "layer4": cfg.train.layer4_lr}
    groups = [
        {"params": params, "lr": lrs[name], "name": name} for name, params in model.trainable_parameters().items()
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    return optimizer, make_scheduler(optimizer, cfg.train.warmup_steps, total_steps)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to each group's learning rate, then cosine decay to zero at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore(
    checkpoint, init_from, model, optimizer, scheduler, objective, data: TrainingData, acc: Accelerator, plan: EpochPlan
) -> TrainState:
    """The state a checkpoint saved, with model, optimizer, scheduler and RNG restored, at its place in the
    epoch as this run reads it; else a fresh start, from init_from's weights where there is one."""
    workers = data.train_workers(acc.num_processes)
    if checkpoint is None:
        if init_from is not None:
            check_compatible(init_from, model, data.vocab)
            load_weights(init_from, model)
            acc.print(f"starting from the weights of {init_from}")
        return TrainState(data_workers=workers)
    check_compatible(checkpoint, model, data.vocab)
    reader = EpochReader(
        acc.num_processes, workers, data.cfg.data.batch_size, plan.epoch_batches, plan.grad_accum_steps
    )
    state = load_checkpoint(checkpoint, model, optimizer, scheduler, acc, reader, objective)
    acc.print(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    return state


def prepare_model(model: Captioner, optimizer, cfg: Config, acc: Accelerator):
    """The model and optimizer as Accelerate wraps them for DDP and mixed precision (not the loader: the
    streams split the shards themselves); the decoder step compiled where the config asks."""
    model.static_shapes = cfg.train.static_shapes
    if cfg.train.compile:  # the recurrence's step is where the time goes; its batch may shrink: dynamic shapes
        model.decoder.step = torch.compile(model.decoder.step, dynamic=not cfg.train.static_shapes)
    return acc.prepare(model, optimizer)


def make_evaluator(data: TrainingData, cfg: Config, acc: Accelerator) -> Evaluator:
    # read from the image shards: the pictures show even when training reads a feature cache
    samples = AttentionSamples(
        list_shards(cfg.data.shards, cfg.data.val_split), cfg.eval.tensorboard_samples, cfg.data.image_size
    )
    return Evaluator(data.val_shards, data.collate, acc, cfg.eval, cfg.data, cfg.model.decoder.alpha_c, samples)


def evaluate(evaluator: Evaluator, model, state: TrainState, metrics: MetricsLog, cfg: Config) -> Evaluation:
    start = time.time()
    result = evaluator(model, meteor=evaluator.wants_meteor(last=state.epoch == cfg.train.epochs))
    samples = result.pop("samples")
    result["eval_seconds"] = time.time() - start
    metrics.log({"split": cfg.data.val_split, **result}, state)
    acc = evaluator.accelerator
    evaluator.attention_samples.log(model, evaluator.vocab, acc, state.step, cfg.eval.max_length)
    if acc.is_main_process:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        tqdm.write(f"step {state.step} epoch {state.epoch} | {shown}")
        for s in samples[: cfg.eval.print_samples]:
            tqdm.write(f"  {s['image_id']}: {s['caption']!r}  (reference: {s['reference']!r})")
    return Evaluation(state.step, result)
