"""The LSTM decoder of Show, Attend and Tell: attention, a gated context, an LSTMCell, word logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from imcap.model.attention import SoftAttention


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int, hidden_dim: int,
                 attention_dim: int, dropout: float):
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

    def step(self, features, projected, embedded, h, c):
        """One decoding step: embedded (B, E) word, state (B, H) -> new h, c and alphas (B, R)."""
        context, alphas = self.attention(features, projected, h)
        context = torch.sigmoid(self.gate(h)) * context  # (B, D)
        h, c = self.lstm(torch.cat([embedded, context.to(embedded.dtype)], dim=1), (h, c))
        return h, c, alphas

    def forward(self, features: torch.Tensor, captions: torch.Tensor, pad_id: int = 0):
        """Teacher forcing. features (B, R, D), captions (B, k, T) token ids, k captions per image.

        Returns logits (B*k, T-1, V) predicting captions[:, :, 1:] and alphas (B*k, T-1, R), zero
        after each caption's end. The projection of the features is computed once per image and
        shared by its k captions. Captions run longest first, and each step computes only those
        still running (Xu et al.'s implementations do the same); dropout and the output layer run
        once over all steps after the recurrence.
        """
        k, length = captions.shape[1], captions.shape[2] - 1
        captions = captions.flatten(0, 1)  # (N, T), N = B*k
        steps = (captions[:, 1:] != pad_id).sum(dim=1)  # (N,) real targets per caption
        order = steps.argsort(descending=True, stable=True)
        ended_by = torch.bincount(steps, minlength=length + 1).cumsum(0)  # captions done after t steps
        running = [n for n in (len(steps) - ended_by[:length]).tolist() if n > 0]  # captions computed at step t
        projected = self.attention.project(features)  # (B, R, A)
        image_of = order // k  # (N,) the image of each sorted caption
        features, projected, captions = features[image_of], projected[image_of], captions[order]
        h, c = self.init_state(features)  # (N, H)
        embedded = self.embedding(captions[:, :-1])  # (N, T-1, E)
        hs, alphas = [], []
        for t, n in enumerate(running):
            h, c, alpha = self.step(features[:n], projected[:n], embedded[:n, t], h[:n], c[:n])
            hs.append(h)  # (n_t, H), n_t shrinking as captions end
            alphas.append(alpha)
        pad_steps = (0, 0, 0, length - len(running))  # captions may all end before T-1
        hs = F.pad(pad_sequence(hs, batch_first=True).transpose(0, 1), pad_steps)  # (N, T-1, H), 0 after ends
        alphas = F.pad(pad_sequence(alphas, batch_first=True).transpose(0, 1), pad_steps)  # (N, T-1, R)
        logits = self.output(self.dropout(hs))  # (N, T-1, V)
        unsort = order.argsort()
        return logits[unsort], alphas[unsort]
