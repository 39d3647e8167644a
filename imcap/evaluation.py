"""Evaluation on a split: teacher-forced loss and decoded captions scored against all references.

Each rank decodes its share of the split (see EvalStream); captions are gathered on every rank and
scored once, on the main process, and every rank gets the same numbers. No collective runs per batch,
so ranks with unequal shares cannot hang.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator

from imcap.data.pipeline import Collate, eval_loader
from imcap.data.prefetch import DeviceBatches
from imcap.demo_scores import demo_scores
from imcap.distributed import broadcast_object, gather_objects
from imcap.metrics import caption_scores
from imcap.model import caption_loss
from imcap.model.decoding import decode
from imcap.text import Vocabulary


class Evaluator:
    def __init__(self, shards: list[str], collate: Collate, vocab: Vocabulary, accelerator: Accelerator, *,
                 batch_size: int, image_size: int, max_images: int, max_length: int, alpha_c: float,
                 beam_size: int = 1, length_penalty: float = 0.0, no_repeat_ngram: int = 0, num_workers: int = 0):
        self.shards, self.collate, self.vocab, self.accelerator = shards, collate, vocab, accelerator
        self.batch_size, self.image_size, self.max_images = batch_size, image_size, max_images
        self.max_length, self.alpha_c, self.num_workers = max_length, alpha_c, num_workers
        self.beam = {"beam_size": beam_size, "length_penalty": length_penalty, "no_repeat_ngram": no_repeat_ngram}

    @torch.no_grad()
    def __call__(self, model, meteor: bool = True) -> dict:
        """meteor=False skips METEOR for a quick score (the other scores are the same either way)."""
        acc = self.accelerator
        model = acc.unwrap_model(model)
        was_training = model.training
        model.eval()
        loader = eval_loader(self.shards, self.collate, rank=acc.process_index, world_size=acc.num_processes,
                             batch_size=self.batch_size, image_size=self.image_size, max_images=self.max_images,
                             num_workers=self.num_workers)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=acc.device)  # (summed token cross-entropy, tokens)
        results, skipped = [], 0
        with DeviceBatches(loader, acc.device) as batches:
            for batch in batches:
                inputs, captions = batch["inputs"], batch["captions"]
                with acc.autocast():
                    logits, alphas = model(captions, **inputs)
                    _, xent = caption_loss(logits, alphas, captions, self.vocab.pad, self.alpha_c)
                    decoded = decode(model, self.vocab.start, self.vocab.end, self.max_length, **self.beam, **inputs)
                tokens = (captions[:, :, 1:] != self.vocab.pad).sum().item()
                loss_sum += torch.tensor([xent.item() * tokens, tokens], dtype=torch.float64, device=acc.device)
                skipped += batch["skipped"]
                # (image id, word ids, attention (words, R), references) per image
                results += list(zip(batch["image_ids"], decoded.tokens, decoded.alphas, batch["references"]))
        model.train(was_training)
        loss_sum = acc.reduce(loss_sum, reduction="sum")
        gathered = gather_objects(acc, (results, skipped))
        # integer ids (COCO's) before string ones, as one split may hold both
        results = sorted((r for part, _ in gathered for r in part), key=lambda r: (isinstance(r[0], str), r[0]))
        ids = [r[0] for r in results]
        if len(set(ids)) != len(ids):
            raise RuntimeError("evaluation saw an image twice; the split was not partitioned across ranks")
        scores = None
        if acc.is_main_process and results:
            ids, tokens, alphas, references = zip(*results)
            scores = caption_scores({i: self.vocab.decode(t) for i, t in zip(ids, tokens)}, dict(zip(ids, references)),
                                    meteor=meteor)
            # the demo set's own scores (none for any other set): right about the picture, and looking at it
            words = [[self.vocab.words[t] for t in caption] for caption in tokens]
            scores.update(demo_scores(words, list(alphas), list(references)) or {})
        scores = broadcast_object(acc, scores)
        return {
            "val_loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item(),
            "images": len(results),
            "skipped": sum(s for _, s in gathered),
            **(scores or {}),
            "samples": [{"image_id": i, "caption": self.vocab.decode(t), "reference": refs[0]}
                        for i, t, _, refs in results],
        }


def evaluate_model(path: str, split: str, out_dir: str, *, beam_size: int = 3, max_images: int = 0,
                   shards: str | None = None, batch_size: int = 64, cpu: bool = False) -> dict:
    """`imcap eval`: score a run, checkpoint or export directory on a split of its shards (or others).

    Writes out_dir/captions.json in the COCO results format ([{"image_id", "caption"}]) and
    out_dir/scores.json; every process decodes its share, the main process writes."""
    from imcap.checkpoint import load_for_inference
    from imcap.data.pipeline import list_shards

    acc = Accelerator(cpu=cpu)
    model, vocab, cfg = load_for_inference(path)
    model.to(acc.device)
    evaluator = Evaluator(list_shards(shards or cfg.data.shards, split), Collate(vocab, cfg.text.max_length, 1), vocab,
                          acc, batch_size=batch_size, image_size=cfg.data.image_size, max_images=max_images,
                          max_length=cfg.eval.max_length, alpha_c=cfg.model.decoder.alpha_c, beam_size=beam_size,
                          length_penalty=cfg.eval.length_penalty, no_repeat_ngram=cfg.eval.no_repeat_ngram)
    result = evaluator(model)
    samples = result.pop("samples")
    if acc.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        captions = [{"image_id": s["image_id"], "caption": s["caption"]} for s in samples]
        (out / "captions.json").write_text(json.dumps(captions, indent=1))
        (out / "scores.json").write_text(json.dumps({"split": split, "beam_size": beam_size, **result}, indent=1))
    return result
