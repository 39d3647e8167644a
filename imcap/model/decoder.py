"""The LSTM decoder of Show, Attend and Tell: attention, a gated context, an LSTMCell, word logits."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from imcap.model.attention import SoftAttention


class Schedule(NamedTuple):
    """Which captions each step of teacher forcing computes (Decoder.schedule)."""

    order: torch.Tensor  # (N,) caption indices, longest first
    runs: list[tuple[int, int]]  # (n, steps): the next `steps` steps compute the first n sorted captions


class Decoder(nn.Module):
    def __init__(
        self, vocab_size: int, feature_dim: int, embed_dim: int, hidden_dim: int, attention_dim: int, dropout: float
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.attention = SoftAttention(feature_dim, hidden_dim, attention_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.gate = nn.Linear(hidden_dim, feature_dim)  # f_beta: how much context each step takes
        self.lstm = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = features.mean(dim=1)  # (B, D)
        return self.init_h(mean), self.init_c(mean)  # (B, H) each

    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, R, D) -> the features and their attention projection (B, R, A), once per image,
        both in the projection's dtype (bf16 under autocast): no step casts the features again."""
        projected = self.attention.project(features)
        return features.to(projected.dtype), projected

    def step(self, features, projected, embedded, h, c):
        """One decoding step: embedded (B, E) word, state (B, H) -> new h, c and alphas (B, R)."""
        context, alphas = self.attention(features, projected, h)
        context = torch.sigmoid(self.gate(h)) * context  # (B, D)
        h, c = self.lstm(torch.cat([embedded, context.to(embedded.dtype)], dim=1), (h, c))
        return h, c, alphas

    def logprobs_step(self, features, projected, words, h, c):
        """One step of decoding from the previous words (B,) ids: what greedy, beam and sampled decoding share.

        -> log-probabilities of the next word (B, V) in float32 (or float64), the new h, c, and alphas (B, R)."""
        h, c, alphas = self.step(features, projected, self.embedding(words), h, c)
        logits = self.output(self.dropout(h))
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=1), h, c, alphas

    @staticmethod
    def schedule(captions: torch.Tensor, pad_id: int = 0, static: bool = False) -> Schedule:
        """captions (B, k, T) -> the order and batch sizes of teacher forcing.

        Captions run longest first and each step computes only those still running (as Xu et al.'s
        implementations do), their number rounded up to an eighth of the batch: every shrink slices
        the state, and the slices' gradients, in kernel launches that bound a GPU step, while an
        eighth more rows costs a CPU little. Reading the counts waits for the device: the captioner
        asks before it queues the encoder's work, so the wait is not for the encoder.

        static: every caption at every step of the padded length instead, in the same order. Nothing is
        read from the device, and the step's shapes are the batch's alone (what CUDA graphs need). The
        steps past a caption's end are computed and masked (no loss, no attention), so the loss and
        gradients are the shrinking schedule's.
        """
        length = captions.shape[2] - 1
        steps = (captions.flatten(0, 1)[:, 1:] != pad_id).sum(dim=1)  # (N,) real targets per caption
        order = steps.argsort(descending=True, stable=True)
        if static:
            return Schedule(order, [(len(steps), length)])
        running = len(steps) - torch.bincount(steps, minlength=length + 1).cumsum(0)[:length]  # (T-1,) at step t
        eighth = -(-len(steps) // 8)
        computed = [min(len(steps), -(-n // eighth) * eighth) for n in running.tolist() if n > 0]
        return Schedule(order, [(n, len(list(run))) for n, run in itertools.groupby(computed)])

    def forward(self, features: torch.Tensor, captions: torch.Tensor, schedule: Schedule, pad_id: int = 0):
        """Teacher forcing. features (B, R, D), captions (B, k, T) token ids, k captions per image.

        Returns logits (B*k, T-1, V) predicting captions[:, :, 1:] and alphas (B*k, T-1, R), zero
        after each caption's end. The projection of the features is computed once per image and
        shared by its k captions; dropout and the output layer run once over all steps after the
        recurrence.
        """
        k, length = captions.shape[1], captions.shape[2] - 1
        features, projected = self.prepare(features)  # (B, R, D), (B, R, A)
        image_of = schedule.order // k  # (N,) the image of each sorted caption, N = B*k
        features, projected = features[image_of], projected[image_of]  # (N, R, D), (N, R, A)
        captions = captions.flatten(0, 1)[schedule.order]  # (N, T)
        h, c = self.init_state(features)  # (N, H)
        embedded = self.embedding(captions[:, :-1]).to(projected.dtype)  # (N, T-1, E), cast once for all steps
        hs, alphas, t = [], [], 0  # per run of steps: states (n, steps, H) and attention (n, steps, R)
        for n, steps in schedule.runs:
            features, projected, h, c = features[:n], projected[:n], h[:n], c[:n]
            run_hs, run_alphas = [], []
            for word in embedded[:n, t : t + steps].unbind(1):  # (n, E)
                h, c, alpha = self.step(features, projected, word, h, c)
                run_hs.append(h)
                run_alphas.append(alpha)
            hs.append(torch.stack(run_hs, dim=1))
            alphas.append(torch.stack(run_alphas, dim=1))
            t += steps
        hs, alphas = (_by_caption(runs, len(captions), length) for runs in (hs, alphas))  # (N, T-1, H), (N, T-1, R)
        alphas = alphas * (captions[:, 1:] != pad_id).unsqueeze(2)  # a run may pass a caption's end
        logits = self.output(self.dropout(hs))  # (N, T-1, V)
        unsort = schedule.order.argsort()
        return logits[unsort], alphas[unsort]


def _by_caption(runs: list[torch.Tensor], captions: int, length: int) -> torch.Tensor:
    """Runs' outputs (n, steps, X) -> (captions, length, X), zero where a caption was not computed."""
    steps = torch.cat([F.pad(run, (0, 0, 0, 0, 0, captions - len(run))) for run in runs], dim=1)
    return F.pad(steps, (0, 0, 0, length - steps.shape[1]))  # captions may all end before `length`
