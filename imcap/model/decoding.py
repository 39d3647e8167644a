"""Decoding captions: greedy search, batched beam search, and sampling (for self-critical training).

Greedy and beam search return `Decoded`: per image the word ids (without <start> and <end>), the
attention over the regions for each of them and the caption's log-probability under the model (its
<end> included). Sampling returns `SampledCaptions`, with the log-probability of every sampled token
and its gradient. None ends a caption before its first word: no training caption is empty, yet <end>
can rank among the first step's top words, and its one log-probability beats that of any whole caption.
All of them run the decoder one `logprobs_step` at a time.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NamedTuple

import torch

from imcap.data.batch import CachedFeatures, Images

if TYPE_CHECKING:
    from imcap.model.captioner import Captioner
    from imcap.model.decoder import Decoder


class Decoded(NamedTuple):
    tokens: list[list[int]]  # word ids, without <start> and <end>
    alphas: list[torch.Tensor]  # (words, R) attention for each word
    logprobs: torch.Tensor  # (B,) log-probability of each caption


class Sampling(NamedTuple):
    """What the captioner's forward samples instead of teacher forcing (self-critical training)."""

    per_image: int  # captions sampled for each image
    max_length: int  # words a caption has at most
    start_id: int
    end_id: int
    temperature: float = 1.0
    generator: torch.Generator | None = None  # on the device of the features
    greedy: bool = False  # also decode each image greedily (the baseline of Rennie et al.), without gradient


class SampledCaptions(NamedTuple):
    tokens: torch.Tensor  # (B*n, L) sampled ids, the n of each image together; end_id after a caption's end
    logprobs: torch.Tensor  # (B*n, L) float32 log-probability of each sampled token under the sampling policy
    mask: torch.Tensor  # (B*n, L) bool: the caption's tokens, the <end> that ended it included
    greedy: torch.Tensor | None  # (B, L') greedy ids, end_id after their end; None unless Sampling.greedy


def _encode(model: Captioner, inputs: Images | CachedFeatures):
    """The features and their attention projection, (B, R, D) and (B, R, A), once per image."""
    return model.decoder.prepare(model.encoder(inputs))


def _greedy_steps(
    decoder: Decoder, features, projected, start_id: int, end_id: int, max_length: int, stop_early: bool = True
):
    """-> ids (B, L) with end_id after each caption's end, attention (B, L, R), log-probabilities (B,).
    stop_early: stop once every caption has ended, which waits for the device at every step; without it,
    max_length steps, whose words after an end are end_id (the same captions)."""
    h, c = decoder.init_state(features)
    batch = features.shape[0]
    words = torch.full((batch,), start_id, dtype=torch.long, device=features.device)
    done = torch.zeros(batch, dtype=torch.bool, device=features.device)
    logprobs = torch.zeros(batch, device=features.device)
    steps, alphas = [], []
    for t in range(max_length):
        step_logprobs, h, c, alpha = decoder.logprobs_step(features, projected, words, h, c)  # (B, V)
        if t == 0:
            step_logprobs[:, end_id] = float("-inf")  # no empty caption
        words = step_logprobs.argmax(dim=1)
        logprobs += step_logprobs.gather(1, words.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0)
        steps.append(words.masked_fill(done, end_id))
        alphas.append(alpha)
        done |= words == end_id
        if stop_early and done.all():
            break
    return torch.stack(steps, dim=1), torch.stack(alphas, dim=1), logprobs


@torch.no_grad()
def greedy_decode(
    model: Captioner, inputs: Images | CachedFeatures, start_id: int, end_id: int, max_length: int
) -> Decoded:
    """The most likely word at every step, for at most max_length steps."""
    features, projected = _encode(model, inputs)
    steps, alphas, logprobs = _greedy_steps(
        model.decoder, features, projected, start_id, end_id, max_length, stop_early=not model.static_shapes
    )
    steps, alphas = steps.tolist(), alphas.cpu()  # (B, L), (B, L, R)
    tokens = [row[: row.index(end_id)] if end_id in row else row for row in steps]
    return Decoded(tokens, [a[: len(t)] for a, t in zip(alphas, tokens)], logprobs.cpu())


def sample_captions(
    decoder: Decoder, features: torch.Tensor, sampling: Sampling, stop_early: bool = True
) -> SampledCaptions:
    """Sample `sampling.per_image` captions of each image (multinomial, at a temperature), from one encoder
    pass: features (B, R, D) -> SampledCaptions. The greedy captions, when asked for, are decoded with
    dropout off, as evaluation decodes. stop_early: as for greedy decoding (_greedy_steps)."""
    n, end_id = sampling.per_image, sampling.end_id
    features, projected = decoder.prepare(features)  # (B, R, D), (B, R, A)
    greedy = None
    if sampling.greedy:
        with torch.no_grad(), _evaluating(decoder):
            greedy = _greedy_steps(
                decoder, features, projected, sampling.start_id, end_id, sampling.max_length, stop_early
            )[0]
    features, projected = (x.repeat_interleave(n, dim=0) for x in (features, projected))  # (B*n, ...)
    h, c = decoder.init_state(features)
    words = torch.full((features.shape[0],), sampling.start_id, dtype=torch.long, device=features.device)
    done = torch.zeros_like(words, dtype=torch.bool)
    tokens, logprobs, mask = [], [], []
    for t in range(sampling.max_length):
        step_logprobs, h, c, _ = decoder.logprobs_step(features, projected, words, h, c)  # (B*n, V)
        if sampling.temperature != 1.0:
            step_logprobs = (step_logprobs / sampling.temperature).log_softmax(dim=1)
        if t == 0:  # no empty caption: the first word is sampled from the others, renormalised
            step_logprobs = step_logprobs.index_fill(1, words.new_tensor([end_id]), float("-inf")).log_softmax(dim=1)
        words = torch.multinomial(step_logprobs.detach().exp(), 1, generator=sampling.generator).squeeze(1)
        logprobs.append(step_logprobs.gather(1, words.unsqueeze(1)).squeeze(1))
        mask.append(~done)
        tokens.append(words.masked_fill(done, end_id))
        done = done | (words == end_id)
        if stop_early and done.all():
            break
    return SampledCaptions(torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1), torch.stack(mask, dim=1), greedy)


@contextlib.contextmanager
def _evaluating(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def beam_search(
    model: Captioner,
    inputs: Images | CachedFeatures,
    start_id: int,
    end_id: int,
    max_length: int,
    beam_size: int,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
) -> Decoded:
    """Batched beam search: every image keeps `beam_size` running captions.

    A caption that emits <end> is finished; its score is its log-probability divided by
    length ** length_penalty (0: no normalisation). An image is done once its best finished caption
    scores at least as well as its best running one could now; when no caption finishes within
    max_length steps, the best running one is returned. no_repeat_ngram=n forbids any n-gram twice.
    """
    decoder = model.decoder
    k = beam_size
    features, projected = (x.repeat_interleave(k, dim=0) for x in _encode(model, inputs))  # (B*k, ...)
    h, c = decoder.init_state(features)
    batch, device = features.shape[0] // k, features.device
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    words = torch.full((batch * k,), start_id, dtype=torch.long, device=device)
    history = torch.empty(batch, k, 0, dtype=torch.long, device=device)  # (B, k, t)
    attention = torch.empty(batch, k, 0, features.shape[1], device=device)  # (B, k, t, R)
    finished: list[list[tuple[float, float, list[int], torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    vocab = decoder.output.out_features
    for t in range(max_length):
        step_logprobs, h, c, alpha = decoder.logprobs_step(features, projected, words, h, c)
        step_logprobs = step_logprobs.view(batch, k, vocab)
        if t == 0:
            step_logprobs[:, :, end_id] = float("-inf")  # no empty caption
        if no_repeat_ngram:
            _block_repeats(step_logprobs, history, no_repeat_ngram)
        candidates = (scores.unsqueeze(2) + step_logprobs).view(batch, k * vocab)
        top_scores, top = candidates.topk(min(2 * k, k * vocab), dim=1)  # (B, 2k): enough to refill k
        beam_of, word_of = top // vocab, top % vocab  # integer division: which beam, which word
        next_beam = torch.zeros(batch, k, dtype=torch.long, device=device)
        next_word = torch.full((batch, k), end_id, dtype=torch.long, device=device)
        next_score = torch.full((batch, k), float("-inf"), device=device)
        alpha = alpha.view(batch, k, -1)
        for b in range(batch):
            if done[b]:
                continue
            alive = 0
            candidates = zip(top_scores[b].tolist(), beam_of[b].tolist(), word_of[b].tolist())
            for rank, (score, beam, word) in enumerate(candidates):
                if score == float("-inf"):
                    break
                if word == end_id:
                    if rank < k:  # only an ending that would have been kept finishes (beam 1 is greedy)
                        tokens = history[b, beam].tolist()
                        finished[b].append(
                            (score / (len(tokens) + 1) ** length_penalty, score, tokens, attention[b, beam].cpu())
                        )
                else:
                    next_beam[b, alive], next_word[b, alive], next_score[b, alive] = beam, word, score
                    alive += 1
                if alive == k:
                    break
            best_running = next_score[b, 0].item() / (t + 2) ** length_penalty
            done[b] = bool(finished[b]) and max(f[0] for f in finished[b]) >= best_running
        if all(done):
            break
        order = (next_beam + torch.arange(batch, device=device).unsqueeze(1) * k).view(-1)  # (B*k,) rows to keep
        history = torch.cat([history.view(batch * k, -1)[order].view(batch, k, -1), next_word.unsqueeze(2)], dim=2)
        attention = torch.cat(
            [
                attention.view(batch * k, -1, attention.shape[-1])[order].view(batch, k, -1, attention.shape[-1]),
                alpha.view(batch * k, -1)[order].view(batch, k, 1, -1),
            ],
            dim=2,
        )
        h, c, words, scores = h[order], c[order], next_word.view(-1), next_score
    tokens, alphas, logprobs = [], [], []
    for b in range(batch):
        if finished[b]:
            _, logprob, best_tokens, weights = max(finished[b], key=lambda f: f[0])
        else:  # nothing ended within max_length: the best running caption
            best_tokens, weights, logprob = history[b, 0].tolist(), attention[b, 0].cpu(), scores[b, 0].item()
        tokens.append(best_tokens)
        alphas.append(weights)
        logprobs.append(logprob)
    return Decoded(tokens, alphas, torch.tensor(logprobs))


def _block_repeats(step_logprobs: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Forbid, for each running caption, every word that would repeat one of its n-grams."""
    if history.shape[2] < n - 1:
        return
    for b, k in ((b, k) for b in range(history.shape[0]) for k in range(history.shape[1])):
        seq = history[b, k].tolist()
        prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}
        if banned:
            step_logprobs[b, k, list(banned)] = float("-inf")


def decode(
    model: Captioner,
    inputs: Images | CachedFeatures,
    start_id: int,
    end_id: int,
    max_length: int,
    beam_size: int = 1,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
) -> Decoded:
    """Greedy search for beam_size 1 (without n-gram blocking), else beam search."""
    if beam_size == 1 and not no_repeat_ngram:
        return greedy_decode(model, inputs, start_id, end_id, max_length)
    return beam_search(model, inputs, start_id, end_id, max_length, beam_size, length_penalty, no_repeat_ngram)
