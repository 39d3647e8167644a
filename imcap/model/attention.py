"""Soft (additive) attention over image regions (Bahdanau et al.; Xu et al. 2015, section 4.2)."""

from __future__ import annotations

import torch
from torch import nn


class SoftAttention(nn.Module):
    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_proj = nn.Linear(feature_dim, attention_dim)
        self.decoder_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, R, D) -> (B, R, A); once per batch, not once per decoding step."""
        return self.encoder_proj(features)

    def forward(self, features: torch.Tensor, projected: torch.Tensor, h: torch.Tensor):
        """-> context (B, D), alphas (B, R) summing to 1 over the regions."""
        scores = self.score(torch.tanh(projected + self.decoder_proj(h).unsqueeze(1))).squeeze(2)  # (B, R)
        alphas = scores.softmax(dim=1, dtype=torch.float32)  # (B, R), float32 also under bf16 autocast
        context = torch.bmm(alphas.unsqueeze(1).to(features.dtype), features).squeeze(1)  # (B, D)
        return context, alphas
