"""The training loop: `train(cfg)` reads top to bottom; the helpers below it are named for what they do.

A step is one optimizer step: `grad_accum_steps` micro-batches on every process, gradients averaged
across processes by DDP, clipped, then AdamW and the learning-rate schedule step once.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from imcap import features as feature_cache
from imcap.caption import AttentionSamples
from imcap.checkpoint import Checkpointer, TrainState, check_compatible, load_checkpoint, resolve_resume
from imcap.config import Config, ConfigError, save_config, to_dict
from imcap.data.dataset import CaptionData, prepare_data
from imcap.data.pipeline import batches_per_epoch, eval_loader, model_inputs
from imcap.data.prefetch import DeviceBatches
from imcap.distributed import EXIT_PREEMPTED, StopFlag, broadcast_object, gather_objects
from imcap.evaluation import Evaluator
from imcap.model import Captioner, caption_loss
from imcap.model.encoder import estimate_batchnorm_stats, estimate_feature_stats

log = logging.getLogger("imcap")


def train(cfg: Config) -> dict:
    """Train as configured; returns the last evaluation's scores."""
    acc = make_accelerator(cfg)
    set_seed(cfg.train.seed)  # the same initial weights on every process
    checkpointer = Checkpointer(cfg.run_dir, acc, cfg.checkpoint.keep_last)  # first: it tidies up after a crash
    resume_from = broadcast_object(acc, resolve_resume(cfg.resume, cfg.run_dir))  # rank 0 decides, before any long work
    stop = StopFlag(cfg.train.preemption_signal)
    metrics = MetricsLog(cfg, acc)
    data = prepare_data(cfg, acc)
    model = Captioner(cfg.model, len(data.vocab))
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = batches_per_epoch(data.num_train_samples, cfg.data.batch_size, acc.num_processes,
                                        cfg.train.grad_accum_steps) // cfg.train.grad_accum_steps
    total_steps = steps_per_epoch * cfg.train.epochs
    scheduler = make_scheduler(optimizer, cfg.train.warmup_steps, total_steps)

    if resume_from:  # before the feature cache: its BatchNorm statistics say which cache is this model's
        check_compatible(resume_from, model, data.vocab)
        state = load_checkpoint(resume_from, model, optimizer, scheduler, acc, data.train_workers(acc.num_processes))
        acc.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch}, "
                  f"batch {state.batches_in_epoch})")
    else:
        state = TrainState(data_workers=data.train_workers(acc.num_processes))
        estimate_batchnorm(model, data, cfg, acc)
    attention_samples = AttentionSamples(data.val_shards, cfg.eval.tensorboard_samples, cfg.data.image_size)
    data = use_feature_cache(model, data, cfg, acc)
    if not resume_from:
        standardize_features(model, data, cfg, acc)
    if cfg.train.compile:  # the recurrence's step is where the time goes; its batch shrinks, so dynamic shapes
        model.decoder.step = torch.compile(model.decoder.step, dynamic=True)
    model, optimizer = acc.prepare(model, optimizer)  # not the loader: the pipeline splits shards itself
    evaluator = make_evaluator(data, cfg, acc)

    threads = f" of {torch.get_num_threads()} CPU thread(s)" if acc.device.type == "cpu" else ""
    acc.print(f"{data.num_train_samples} train images, {len(data.vocab)} words, {acc.num_processes} "
              f"process(es){threads}, {steps_per_epoch} steps per epoch, {total_steps} steps")
    progress = tqdm(total=total_steps, initial=state.step, disable=not acc.is_main_process, dynamic_ncols=True)
    scores, scored_at = {}, None  # the last evaluation, and the step it evaluated
    epoch_batches = steps_per_epoch * cfg.train.grad_accum_steps  # per process
    loader = data.train_loader(epoch=state.epoch, epochs=cfg.train.epochs - state.epoch, skip=state.batches_in_epoch,
                               num_batches=epoch_batches, rank=acc.process_index, world_size=acc.num_processes)
    with DeviceBatches(loader, acc.device) as batches:  # one loader for all epochs: its workers start once
        for epoch in range(state.epoch, cfg.train.epochs):
            while state.batches_in_epoch < epoch_batches:
                # never into the next epoch: resumed with another grad_accum_steps, the last step is short
                accum = min(cfg.train.grad_accum_steps, epoch_batches - state.batches_in_epoch)
                micro_batches = list(itertools.islice(batches, accum))
                step_metrics = train_step(model, optimizer, scheduler, micro_batches, data.vocab.pad, cfg, acc)
                state.step += 1
                state.batches_in_epoch += len(micro_batches)
                metrics.update(step_metrics, micro_batches)
                progress.update()
                if state.step % cfg.train.log_every == 0:
                    progress.set_postfix(metrics.log_train(state, scheduler.get_last_lr()[0]))
                if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0:
                    scores = evaluate(evaluator, attention_samples, model, state, metrics, cfg,
                                      final=state.step == total_steps)
                    scored_at = state.step
                stopped_by = stop.agreed(acc)  # after the step's evaluation: a resume would not repeat it
                if stopped_by or (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0):
                    checkpointer.save(state, model, optimizer, scheduler, data.vocab, cfg,
                                      best_score(scores, scored_at, state, cfg))
                if stopped_by:  # every rank saved the same step
                    acc.print(f"stopped by {stopped_by} at step {state.step}; checkpoint saved, "
                              f"exiting with {EXIT_PREEMPTED}")
                    acc.end_training()
                    sys.exit(EXIT_PREEMPTED)
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            last = epoch + 1 == cfg.train.epochs
            if scored_at != state.step and (last or not cfg.eval.every_steps):  # the end is always evaluated
                scores = evaluate(evaluator, attention_samples, model, state, metrics, cfg, final=last)
                scored_at = state.step
            checkpointer.save(state, model, optimizer, scheduler, data.vocab, cfg,
                              best_score(scores, scored_at, state, cfg))
    progress.close()
    if not scores:  # resumed after the end: nothing was trained, report the model as it is
        scores = evaluate(evaluator, attention_samples, model, state, metrics, cfg, final=True)
    acc.end_training()
    return scores


def train_step(model, optimizer, scheduler, micro_batches: list[dict], pad_id: int, cfg: Config,
               acc: Accelerator) -> dict:
    model.train()
    losses = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else acc.no_sync(model):  # all-reduce gradients once per step
            captions = batch["captions"]  # (B, k, T), on the device with batch["inputs"] (DeviceBatches)
            logits, alphas = model(captions, **batch["inputs"])
            loss, xent = caption_loss(logits, alphas, captions, pad_id, cfg.model.decoder.alpha_c)
            acc.backward(loss / len(micro_batches))
        losses.append(xent.detach())
    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"xent": torch.stack(losses).mean(), "grad_norm": grad_norm}


def make_accelerator(cfg: Config) -> Accelerator:
    acc = Accelerator(cpu=cfg.train.cpu, mixed_precision=cfg.train.mixed_precision, log_with="tensorboard",
                      project_dir=str(cfg.run_dir), step_scheduler_with_optimizer=False)
    if acc.device.type == "cpu":  # accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        share = cores // int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, share - cfg.data.num_workers))  # workers decode beside it
    logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    return acc


def make_optimizer(model: Captioner, cfg: Config) -> torch.optim.Optimizer:
    lrs = {"decoder": cfg.train.lr, "layer4": cfg.train.layer4_lr}
    groups = [{"params": params, "lr": lrs[name], "name": name}
              for name, params in model.trainable_parameters().items()]
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to each group's learning rate, then cosine decay to zero at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def first_train_batches(data: CaptionData, cfg: Config, images: int, batch_size: int):
    """The first `images` train images (or their cached features), centre-cropped: the same on every rank."""
    return eval_loader(data.train_shards, data.collate, rank=0, world_size=1, batch_size=batch_size,
                       image_size=cfg.data.image_size, max_images=images, num_workers=0)


def estimate_batchnorm(model: Captioner, data: CaptionData, cfg: Config, acc: Accelerator) -> None:
    """The encoder's BatchNorm statistics from the first train images, where the config asks for them."""
    n = cfg.model.encoder.batchnorm_stats_images
    if not n:
        if cfg.model.encoder.train_layer4 and cfg.model.encoder.weights == "none":
            raise ConfigError("model.encoder.train_layer4 with weights none needs model.encoder.batchnorm_stats_images "
                              "> 0: with the initial BatchNorm statistics layer4 trains on features about 12 times "
                              "smaller than it is evaluated on, and learns nothing evaluation can use")
        return
    if feature_cache.read_cache_meta(cfg.data.shards):
        raise ConfigError(f"model.encoder.batchnorm_stats_images needs images, but data.shards ({cfg.data.shards}) "
                          "is a feature cache: point it at the image shards, or set it to 0")
    model.to(acc.device)
    # in training batches: the statistics a training layer4 sees, and the same whatever eval.batch_size says
    batches = (model_inputs(b, acc.device)["images"] for b in first_train_batches(data, cfg, n, cfg.data.batch_size))
    with acc.autocast():
        seen = estimate_batchnorm_stats(model.encoder, batches)
    acc.print(f"estimated the encoder's BatchNorm statistics on {seen} train images")


def standardize_features(model: Captioner, data: CaptionData, cfg: Config, acc: Accelerator) -> None:
    n = cfg.model.encoder.feature_stats_images
    if not n:
        return
    model.to(acc.device)
    batches = (model_inputs(b, acc.device) for b in first_train_batches(data, cfg, n, cfg.eval.batch_size))
    seen = estimate_feature_stats(model.encoder, batches)
    acc.print(f"standardising the encoder's features with statistics of {seen} train images")


def use_feature_cache(model: Captioner, data: CaptionData, cfg: Config, acc: Accelerator) -> CaptionData:
    """With data.feature_cache, build (or reuse) the cache of the frozen encoder part and read from it."""
    encoder, d = model.encoder, cfg.data
    if feature_cache.read_cache_meta(d.shards):  # pointed at a cache directly
        feature_cache.check_cache(d.shards, encoder, d.image_size, cfg.model.encoder.weights)
        return data
    if not d.feature_cache:
        return data
    cache = feature_cache.cache_dir_for(d.shards, encoder, d.image_size)
    if not feature_cache.cache_is_complete(cache, d.shards):
        acc.print(f"caching the frozen encoder's features in {cache}")
        start = time.time()
        with acc.autocast():  # bf16 on a CPU with bf16 instructions: twice as fast, and the cache holds bf16
            sizes = feature_cache.build_cache_shards(encoder, d.shards, [d.train_split, d.val_split], cache,
                                                     d.image_size, cfg.eval.batch_size, acc.device,
                                                     rank=acc.process_index, world_size=acc.num_processes)
        all_sizes = {k: v for part in gather_objects(acc, sizes) for k, v in part.items()}
        if acc.is_main_process:
            feature_cache.finish_cache(cache, d.shards, all_sizes, encoder, d.image_size, cfg.model.encoder.weights, "bf16")
        acc.wait_for_everyone()
        acc.print(f"cached {sum(all_sizes.values())} images in {time.time() - start:.0f} s")
    return data.with_shards(str(cache))


def make_evaluator(data: CaptionData, cfg: Config, acc: Accelerator) -> Evaluator:
    return Evaluator(data.val_shards, data.collate, data.vocab, acc, batch_size=cfg.eval.batch_size,
                     image_size=cfg.data.image_size, max_images=cfg.eval.max_images,
                     max_length=cfg.eval.max_length, alpha_c=cfg.model.decoder.alpha_c, beam_size=cfg.eval.beam_size,
                     length_penalty=cfg.eval.length_penalty, no_repeat_ngram=cfg.eval.no_repeat_ngram)


def evaluate(evaluator: Evaluator, attention_samples: AttentionSamples, model, state: TrainState,
             metrics: MetricsLog, cfg: Config, final: bool) -> dict:
    start = time.time()
    result = evaluator(model, meteor=cfg.eval.meteor == "every" or (final and cfg.eval.meteor == "last"))
    samples = result.pop("samples")
    result["eval_seconds"] = time.time() - start
    metrics.log({"split": cfg.data.val_split, **result}, state)
    attention_samples.log(model, evaluator.vocab, evaluator.accelerator, state.step, cfg.eval.max_length)
    if evaluator.accelerator.is_main_process:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        tqdm.write(f"step {state.step} epoch {state.epoch} | {shown}")
        for s in samples[: cfg.eval.print_samples]:
            tqdm.write(f"  {s['image_id']}: {s['caption']!r}  (reference: {s['reference']!r})")
    return result


def best_score(scores: dict, scored_at: int | None, state: TrainState, cfg: Config) -> tuple[str, float, bool] | None:
    """(metric, value, higher is better) for `best`, only from an evaluation of the weights being saved."""
    metric = cfg.checkpoint.best_metric
    value = scores.get(metric) if scored_at == state.step else None
    return None if value is None else (metric, value, metric != "val_loss")


class MetricsLog:
    """runs/<name>/metrics.jsonl (one JSON object per line) and TensorBoard, from the main process.

    Training values are averaged over the steps since the last log line and over all processes."""

    def __init__(self, cfg: Config, acc: Accelerator):
        self.acc, self.path = acc, cfg.run_dir / "metrics.jsonl"
        if acc.is_main_process:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, cfg.run_dir / "config.yaml")
            print("resolved config:\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
        acc.init_trackers("tensorboard", config=_flat(to_dict(cfg)))
        self._reset()

    def _reset(self):
        # xent and grad norm summed where they are: reading them at every step would wait for the GPU
        self.losses = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        self.counts = torch.zeros(2, dtype=torch.float64)  # images, skipped samples
        self.steps, self.start = 0, time.time()

    def update(self, step_metrics: dict, micro_batches: list[dict]) -> None:
        self.losses += torch.stack([step_metrics["xent"], step_metrics["grad_norm"]]).to(self.losses)
        self.counts += torch.tensor([sum(len(b["captions"]) for b in micro_batches),
                                     sum(b["skipped"] for b in micro_batches)], dtype=torch.float64)
        self.steps += 1

    def log_train(self, state: TrainState, lr: float) -> dict:
        totals = self.acc.reduce(torch.cat([self.losses, self.counts.to(self.acc.device)]), reduction="sum").cpu()
        seconds = time.time() - self.start
        values = {"train_loss": totals[0].item() / (self.steps * self.acc.num_processes),
                  "grad_norm": totals[1].item() / (self.steps * self.acc.num_processes),
                  "lr": lr, "images_per_s": totals[2].item() / seconds, "skipped_samples": int(totals[3])}
        self.log(values, state)
        self._reset()
        return {"loss": f"{values['train_loss']:.3f}", "lr": f"{lr:.2e}", "img/s": f"{values['images_per_s']:.0f}"}

    def log(self, values: dict, state: TrainState) -> None:
        if not self.acc.is_main_process:
            return
        record = {"step": state.step, "epoch": state.epoch, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.acc.log({k: v for k, v in values.items() if isinstance(v, (int, float)) and v is not None},
                     step=state.step)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
