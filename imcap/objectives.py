"""What a training step minimises: cross-entropy, or self-critical training on CIDEr-D (train.objective).

An objective takes the model (as Accelerate wrapped it) and one micro-batch and returns the loss to
back-propagate and the values to log (scalar tensors, which MetricsLog averages). A checkpoint keeps
what it holds: this rank's sampler state (`state_dict`), and the reward's document frequencies (`save`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from imcap.config import Config, ScstConfig
from imcap.data.batch import Batch
from imcap.data.training_data import TrainingData, split_references
from imcap.model import caption_loss
from imcap.model.decoding import Sampling
from imcap.rewards import FREQUENCIES_FILE, CiderD, DocumentFrequencies, document_frequencies
from imcap.text import Vocabulary

log = logging.getLogger(__name__)
# a caption ending in one of these stopped mid-phrase: the ending self-critical training is known to learn
FUNCTION_WORDS = ("a", "an", "the", "and", "in", "on", "of", "with", "at", "to", "for", "by", "near", "is", "are")


class CrossEntropy:
    """Teacher-forced cross-entropy over the captions, plus alpha_c times the doubly stochastic penalty."""

    def __init__(self, pad_id: int, alpha_c: float):
        self.pad_id, self.alpha_c = pad_id, alpha_c

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, alphas = model(batch.captions, batch.inputs)  # captions (B, k, T)
        loss, xent = caption_loss(logits, alphas, batch.captions, self.pad_id, self.alpha_c)
        return loss, {"train_loss": xent.detach()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save(self, directory: Path) -> None:
        pass


class SelfCritical:
    """Self-critical sequence training (Rennie et al. 2017): sample n captions of each image, reward each by
    its CIDEr-D, and push up the log-probability of those that beat the baseline:

        loss = -mean over samples of (reward - baseline) * (sum of the sample's token log-probabilities)

    The baseline is the mean reward of the image's other samples ("new self-critical"), or the CIDEr-D of
    its greedy caption. Each rank samples and scores its own images: DDP's all-reduce of the gradients is
    the only communication."""

    def __init__(self, cfg: ScstConfig, reward: CiderD, vocab: Vocabulary, generator: torch.Generator):
        self.cfg, self.reward, self.vocab, self.generator = cfg, reward, vocab, generator
        self.function_words = torch.tensor([vocab.index[w] for w in FUNCTION_WORDS if w in vocab.index])

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, vocab, n = self.cfg, self.vocab, self.cfg.samples_per_image
        sampling = Sampling(
            n, cfg.max_length, vocab.start, vocab.end, cfg.temperature, self.generator, cfg.baseline == "greedy"
        )
        sampled = model(None, batch.inputs, sampling=sampling)
        references = self.reward.encode_references(batch.references)
        tokens, mask = sampled.tokens.cpu(), sampled.mask.cpu()  # (B*n, L)
        images = np.arange(len(batch))
        rewards = self.reward(caption_ids(tokens, mask), images.repeat(n), references).reshape(-1, n)  # (B, n)
        if cfg.baseline == "greedy":
            greedy = sampled.greedy.cpu()
            baseline = self.reward(caption_ids(greedy, _until_end(greedy, vocab.end)), images, references)[:, None]
        else:
            baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (n - 1)  # (B, n) the others' mean
        advantage = torch.from_numpy(rewards - baseline).flatten().to(sampled.logprobs.device, sampled.logprobs.dtype)
        sample_logprobs = (sampled.logprobs * sampled.mask).sum(dim=1)  # (B*n,)
        loss = -(advantage * sample_logprobs).mean()
        return loss, {"train_loss": loss.detach(), **self._described(rewards, baseline, tokens, mask)}

    def _described(self, rewards, baseline, tokens, mask) -> dict[str, torch.Tensor]:
        """What shows whether training goes well: the rewards, the captions' length and how they end."""
        ended = tokens.gather(1, (mask.sum(dim=1, keepdim=True) - 1)) == self.vocab.end  # (B*n, 1)
        words = mask.sum(dim=1) - ended.squeeze(1).long()  # (B*n,) without the <end>
        last_word = tokens.gather(1, (words - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        values = {
            "reward": rewards.mean(),
            "baseline": np.broadcast_to(baseline, rewards.shape).mean(),
            "reward_std": rewards.std(),
            "caption_length": words.double().mean(),
            "bad_endings": torch.isin(last_word, self.function_words).double().mean(),
        }
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()}

    def state_dict(self) -> dict:
        return {"sampler": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" in state:
            self.generator.set_state(state["sampler"])

    def save(self, directory: Path) -> None:
        self.reward.frequencies.save(directory / FREQUENCIES_FILE)


def caption_ids(tokens: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """(N, L) ids and the mask of each caption's tokens -> each caption's ids, its <end> included if it ended."""
    lengths = mask.sum(dim=1).tolist()
    return [row[:length] for row, length in zip(tokens.numpy(), lengths)]


def _until_end(tokens: torch.Tensor, end_id: int) -> torch.Tensor:
    """The mask of each caption's tokens up to and with its first end_id (all of them if it has none)."""
    ended_before = (tokens == end_id).long().cumsum(dim=1) - (tokens == end_id).long()
    return ended_before == 0


def make_objective(cfg: Config, data: TrainingData, acc: Accelerator, checkpoint: Path | None):
    """The configured objective; for self-critical training, with the document frequencies the checkpoint
    it resumes holds, else counted over the train split's references (by the main process, into the run
    directory), and a sampler seeded for this rank."""
    if cfg.train.objective == "xent":
        return CrossEntropy(data.vocab.pad, cfg.model.decoder.alpha_c)
    saved = checkpoint / FREQUENCIES_FILE if checkpoint else None
    if saved is None or not saved.exists():
        saved = cfg.run_dir / FREQUENCIES_FILE
        if acc.is_main_process:
            frequencies = document_frequencies(split_references(data.train_shards), data.vocab)
            frequencies.save(saved)
            acc.print(f"CIDEr-D document frequencies of {frequencies.images} train images' references: {saved}")
        acc.wait_for_everyone()
    generator = torch.Generator(acc.device).manual_seed(sampler_seed(cfg.train.seed, acc.process_index))
    return SelfCritical(cfg.scst, CiderD(DocumentFrequencies.load(saved), data.vocab), data.vocab, generator)


def sampler_seed(seed: int, rank: int) -> int:
    """Each rank's own sampler seed: ranks that sampled alike would explore alike."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])
