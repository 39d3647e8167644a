"""Evaluation on a split: teacher-forced loss and decoded captions scored against all references.

Each rank decodes its share of the split (see EvalStream); captions are gathered on every rank and
scored once, on the main process, and every rank gets the same numbers. No collective runs per batch,
so ranks with unequal shares cannot hang.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from imcap.caption import AttentionSamples
from imcap.config import DataConfig, EvalConfig
from imcap.data.batch import Collate
from imcap.data.prefetch import DeviceBatches
from imcap.data.shards import list_shards
from imcap.data.streams import EvalStream, eval_loader
from imcap.demo_scores import demo_scores
from imcap.distributed import broadcast_object, gather_objects, part_of
from imcap.metrics import caption_scores
from imcap.model import caption_loss
from imcap.model.decoding import decode


@dataclass(frozen=True)
class Evaluation:
    """The scores of an evaluation of the weights of `step`."""

    step: int
    scores: dict


class Evaluator:
    """Evaluates a model on the shards of a split, as the eval config says; also says when it is due.

    attention_samples, when given, are captioned into TensorBoard at every evaluation."""

    def __init__(
        self,
        shards: list[str],
        collate: Collate,
        accelerator: Accelerator,
        cfg: EvalConfig,
        data: DataConfig,
        alpha_c: float,
        attention_samples: AttentionSamples | None = None,
    ):
        self.shards, self.collate, self.vocab, self.accelerator = shards, collate, collate.vocab, accelerator
        self.cfg, self.data, self.alpha_c, self.attention_samples = cfg, data, alpha_c, attention_samples

    def due(self, step: int, epoch_ended: bool, last: bool) -> bool:
        """Every eval.every_steps steps; at the end of every epoch when that is 0; always at the end."""
        every = self.cfg.every_steps
        return bool(every and step % every == 0) or (epoch_ended and (last or not every))

    def wants_meteor(self, last: bool) -> bool:
        return self.cfg.meteor == "every" or (last and self.cfg.meteor == "last")

    @torch.no_grad()
    def __call__(self, model, meteor: bool = True) -> dict:
        """The scores, and "samples": (image id, caption, first reference) of every image. meteor=False skips
        METEOR for a quick score (the other scores are the same either way)."""
        acc, vocab = self.accelerator, self.vocab
        model = acc.unwrap_model(model)
        was_training = model.training
        model.eval()
        stream = EvalStream(
            self.shards,
            self.collate,
            part_of(acc),
            self.cfg.batch_size,
            self.data.image_size,
            self.cfg.max_images,
            self.data.read_attempts,
        )
        loss_sum = torch.zeros(2, dtype=torch.float64, device=acc.device)  # (summed token cross-entropy, tokens)
        search = {
            "beam_size": self.cfg.beam_size,
            "length_penalty": self.cfg.length_penalty,
            "no_repeat_ngram": self.cfg.no_repeat_ngram,
        }
        results, skipped = [], 0
        with DeviceBatches(eval_loader(stream), acc.device) as batches:
            for batch in batches:
                with acc.autocast():
                    logits, alphas = model(batch.captions, batch.inputs)
                    _, xent = caption_loss(logits, alphas, batch.captions, vocab.pad, self.alpha_c)
                    decoded = decode(model, batch.inputs, vocab.start, vocab.end, self.cfg.max_length, **search)
                tokens = (batch.captions[:, :, 1:] != vocab.pad).sum().item()
                loss_sum += torch.tensor([xent.item() * tokens, tokens], dtype=torch.float64, device=acc.device)
                skipped += batch.skipped
                # (image id, word ids, attention (words, R), references) per image
                results += list(zip(batch.image_ids, decoded.tokens, decoded.alphas, batch.references))
        model.train(was_training)
        loss_sum = acc.reduce(loss_sum, reduction="sum")
        gathered = gather_objects(acc, (results, skipped))
        # integer ids (COCO's) before string ones, as one split may hold both
        results = sorted((r for part, _ in gathered for r in part), key=lambda r: (isinstance(r[0], str), r[0]))
        ids = [r[0] for r in results]
        if len(set(ids)) != len(ids):
            raise RuntimeError("evaluation saw an image twice; the split was not partitioned across ranks")
        scores = broadcast_object(acc, self._score(results, meteor) if acc.is_main_process and results else None)
        return {
            "val_loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item(),
            "images": len(results),
            "skipped": sum(s for _, s in gathered),
            **(scores or {}),
            "samples": [{"image_id": i, "caption": vocab.decode(t), "reference": refs[0]} for i, t, _, refs in results],
        }

    def _score(self, results: list, meteor: bool) -> dict:
        ids, tokens, alphas, references = zip(*results)
        captions = {i: self.vocab.decode(t) for i, t in zip(ids, tokens)}
        scores = caption_scores(captions, dict(zip(ids, references)), meteor=meteor)
        # the demo set's own scores (none for any other set): right about the picture, and looking at it
        words = [[self.vocab.words[t] for t in caption] for caption in tokens]
        return scores | (demo_scores(words, list(alphas), list(references)) or {})


def evaluate_model(
    path: str, split: str, out_dir: str, shards: str | None = None, cpu: bool = False, **eval_overrides
) -> dict:
    """`imcap eval`: score a run, checkpoint or export directory on a split of its shards (or others), with
    its eval config changed by eval_overrides (beam_size, max_images, batch_size...).

    Writes out_dir/captions.json in the COCO results format ([{"image_id", "caption"}]) and
    out_dir/scores.json; every process decodes its share, the main process writes."""
    from imcap.inference import load_for_inference

    acc = Accelerator(cpu=cpu)
    model, vocab, cfg = load_for_inference(path)
    model.to(acc.device)
    settings = dataclasses.replace(cfg.eval, **eval_overrides)
    evaluator = Evaluator(
        list_shards(shards or cfg.data.shards, split),
        Collate(vocab, cfg.text.max_length, 1),
        acc,
        settings,
        cfg.data,
        cfg.model.decoder.alpha_c,
    )
    result = evaluator(model)
    samples = result.pop("samples")
    if acc.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        captions = [{"image_id": s["image_id"], "caption": s["caption"]} for s in samples]
        (out / "captions.json").write_text(json.dumps(captions, indent=1))
        (out / "scores.json").write_text(
            json.dumps({"split": split, "beam_size": settings.beam_size, **result}, indent=1)
        )
    acc.end_training()  # the process group ends before the interpreter: no rank aborts at exit
    return result
