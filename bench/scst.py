"""Self-critical training's cost, measured side by side in one run (`bench/throughput.py --scst`):

- the reward: imcap's CIDEr-D on token ids against pycocoevalcap's `Cider` on the same captions as text,
  each of the step's captions scored against its image's references (pycocoevalcap counts its document
  frequencies over these references; tests/test_scst.py shows the two give the same scores);
- the step: an SCST optimizer step (n samples of each image plus its greedy caption, each rewarded) against
  imcap's cross-entropy step on the same images with n captions each, in caption-samples per second.

The captions are what a trained model samples, roughly: each is one of its image's references with about
a third of its words replaced and its end cut at random. The references are random sentences over the
vocabulary, 5 an image, 8 to 16 words; the document frequencies come from 2,000 such images.
"""

from __future__ import annotations

import itertools
import random
import time

import numpy as np
import torch
from timing import TimedSteps, alternating

from imcap.config import ScstConfig, load_config
from imcap.data.batch import Batch, CachedFeatures, Images
from imcap.model import Captioner
from imcap.objectives import CrossEntropy, SelfCritical
from imcap.rewards import CiderD, document_frequencies
from imcap.text import SPECIALS, Vocabulary

REFERENCES, CORPUS = 5, 2000  # references per image; images the document frequencies are counted over


def sentences(rng: random.Random, words: list[str], count: int) -> list[str]:
    return [" ".join(rng.choices(words, k=rng.randint(8, 16))) for _ in range(count)]


def sampled_like(rng: random.Random, reference: str, words: list[str]) -> str:
    kept = [w if rng.random() > 0.3 else rng.choice(words) for w in reference.split()]
    return " ".join(kept[: rng.randint(len(kept) // 2, len(kept))])


def reward_times(reward: CiderD, vocab: Vocabulary, references: list[list[str]], captions: list[list[str]], repeats=7):
    """-> (imcap's seconds, pycocoevalcap's seconds), the median of `repeats` alternating runs, to score every
    caption against its image's references: imcap's from token ids, pycocoevalcap's from tokenised text."""
    from pycocoevalcap.cider.cider import Cider

    flat = [(image, c) for image, cs in enumerate(captions) for c in cs]
    gts = {i: [f"{r} <end>" for r in references[image]] for i, (image, _) in enumerate(flat)}
    res = {i: [f"{c} <end>"] for i, (_, c) in enumerate(flat)}

    ids = [np.array([vocab.index[w] for w in c.split()] + [vocab.end]) for _, c in flat]  # as sampling gives them
    images = np.array([image for image, _ in flat])

    def ours():  # the references from their text, as in training
        return reward(ids, images, reward.encode_references(references))

    def theirs():  # its document frequencies: these references, not the corpus's
        return Cider().compute_score(gts, res)[1]

    times = {ours: [], theirs: []}
    for _ in range(repeats):
        for score in times:
            start = time.perf_counter()
            score()
            times[score].append(time.perf_counter() - start)
    return float(np.median(times[ours])), float(np.median(times[theirs]))


def run(args, device, images: int) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(args.vocab - len(SPECIALS))]
    vocab = Vocabulary([*SPECIALS, *words], 1)
    n = args.captions  # samples per image in SCST, captions per image in cross-entropy
    corpus = [sentences(rng, words, REFERENCES) for _ in range(CORPUS)]
    reward = CiderD(document_frequencies(corpus, vocab), vocab)
    references = corpus[:images]
    captions = [[sampled_like(rng, rng.choice(refs), words) for _ in range(n + 1)] for refs in references]
    ours, theirs = reward_times(reward, vocab, references, captions)
    print(
        f"reward: {images * (n + 1)} captions ({images} images x {n} samples + greedy): imcap {ours * 1e3:.1f} ms, "
        f"pycocoevalcap Cider {theirs * 1e3:.1f} ms ({theirs / ours:.1f}x faster)",
        flush=True,
    )
    torch.manual_seed(0)
    dims = [f"model.decoder.{k}_dim={args.dim}" for k in ("embed", "hidden", "attention")]
    model = Captioner(load_config(None, ["model.encoder.weights=none", *dims]).model, len(vocab)).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator(device).manual_seed(0)
    scst = SelfCritical(ScstConfig(n, "mean", max_length=args.length), reward, vocab, generator)
    greedy = SelfCritical(ScstConfig(n, "greedy", max_length=args.length), reward, vocab, generator)
    width = args.length + 2  # <start>, at most `length` words, <end>
    captions_ids = torch.tensor(
        [[(vocab.encode(c, args.length) + [vocab.pad] * width)[:width] for c in refs[:n]] for refs in references]
    ).to(device)  # (B, n, T): the image's references, one a caption slot
    pixels = torch.randint(0, 256, (images, 3, args.image_size, args.image_size), dtype=torch.uint8).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        cached = model.encoder.frozen_features(pixels)
    objectives = {"xent": CrossEntropy(vocab.pad, 1.0), "scst mean": scst, "scst greedy": greedy}

    def step_loss(objective):
        def loss(batch):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                return objective(model, batch)[0], images * n

        return loss

    for name, inputs in (("frozen encoder", Images(pixels)), ("cached features", CachedFeatures(cached))):
        batch = itertools.repeat(Batch(captions_ids, inputs, references, list(range(images))))
        steps = [TimedSteps(k, step_loss(o), batch, optimizer, device) for k, o in objectives.items()]
        alternating(steps, args.seconds)
        xent, *scst_steps = steps
        print(
            f"{name:15s} cross-entropy {xent.rate:9.1f} caption-samples/s, {xent.tflops:.3f} TFLOP/s | "
            + " | ".join(
                f"{s.name} {s.rate:9.1f} ({s.rate / xent.rate:.2f}x), {s.tflops:.3f} TFLOP/s" for s in scst_steps
            ),
            flush=True,
        )
