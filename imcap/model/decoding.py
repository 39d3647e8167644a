"""Decoding captions from a trained Captioner: greedy search and batched beam search.

Both return `Decoded`: per image the word ids (without <start> and <end>), the attention over the
regions for each of them and the caption's log-probability under the model (its <end> included).
Neither ends a caption before its first word: no training caption is empty, yet <end> can rank among
the first step's top words, and its one log-probability beats that of any whole caption.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from imcap.data.batch import CachedFeatures, Images
from imcap.model.captioner import Captioner


class Decoded(NamedTuple):
    tokens: list[list[int]]  # word ids, without <start> and <end>
    alphas: list[torch.Tensor]  # (words, R) attention for each word
    logprobs: torch.Tensor  # (B,) log-probability of each caption


def _start(model: Captioner, inputs: Images | CachedFeatures, copies: int):
    """Encode once, then repeat the features `copies` times per image: features, projection, h, c."""
    decoder = model.decoder
    features, projected = decoder.prepare(model.encoder(inputs))  # (B, R, D), (B, R, A)
    features, projected = (x.repeat_interleave(copies, dim=0) for x in (features, projected))
    h, c = decoder.init_state(features)
    return features, projected, h, c


@torch.no_grad()
def greedy_decode(
    model: Captioner, inputs: Images | CachedFeatures, start_id: int, end_id: int, max_length: int
) -> Decoded:
    """The most likely word at every step, for at most max_length steps."""
    decoder = model.decoder
    features, projected, h, c = _start(model, inputs, 1)
    batch = features.shape[0]
    words = torch.full((batch,), start_id, dtype=torch.long, device=features.device)
    done = torch.zeros(batch, dtype=torch.bool, device=features.device)
    logprobs = torch.zeros(batch, device=features.device)
    steps, alphas = [], []
    for t in range(max_length):
        h, c, alpha = decoder.step(features, projected, decoder.embedding(words), h, c)
        step_logprobs = decoder.output(h).float().log_softmax(dim=1)  # (B, V)
        if t == 0:
            step_logprobs[:, end_id] = float("-inf")  # no empty caption
        words = step_logprobs.argmax(dim=1)
        logprobs += step_logprobs.gather(1, words.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0)
        steps.append(words.masked_fill(done, end_id))
        alphas.append(alpha)
        done |= words == end_id
        if done.all():
            break
    steps, alphas = torch.stack(steps, dim=1).tolist(), torch.stack(alphas, dim=1).cpu()  # (B, L), (B, L, R)
    tokens = [row[: row.index(end_id)] if end_id in row else row for row in steps]
    return Decoded(tokens, [a[: len(t)] for a, t in zip(alphas, tokens)], logprobs.cpu())


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
    features, projected, h, c = _start(model, inputs, k)  # (B*k, ...)
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
        h, c, alpha = decoder.step(features, projected, decoder.embedding(words), h, c)
        step_logprobs = decoder.output(h).float().log_softmax(dim=1).view(batch, k, vocab)
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
