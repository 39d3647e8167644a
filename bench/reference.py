"""The straightforward Show, Attend and Tell training step, the baseline of bench/throughput.py.

Written the way the best-known tutorial implementation (sgrvinod's a-PyTorch-Tutorial-to-Image-
Captioning) writes it: every caption sample is its own row with its own copy of the image, so the
encoder runs once per caption; the attention's projection of the features is recomputed at every
decoding step; dropout and the output layer run inside the time loop, writing into a preallocated
float32 tensor; as in the tutorial, the rows run longest caption first and each step computes only
the captions still running. Its parameters have the names and shapes of imcap's Captioner, so
`ReferenceCaptioner(...).load_state_dict(captioner.state_dict())` gives the same function to
compare against.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ReferenceEncoder(nn.Module):
    def __init__(self, train_layer4: bool):
        super().__init__()
        self.cnn = nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-2])
        self.cnn.requires_grad_(False)
        self.cnn[-1].requires_grad_(train_layer4)
        self.train_layer4 = train_layer4
        self.register_buffer("feature_mean", torch.zeros(2048))
        self.register_buffer("feature_std", torch.ones(2048))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = (images.to(self.mean.dtype) / 255 - self.mean) / self.std
        features = self.cnn(x).flatten(2).transpose(1, 2)  # frozen layers build no graph: no parameter wants one
        return (features - self.feature_mean) / self.feature_std

    def train(self, mode=True):
        super().train(mode)
        self.cnn[:-1].eval()
        if not self.train_layer4:
            self.cnn[-1].eval()
        return self


class Attention(nn.Module):
    def __init__(self, feature_dim, hidden_dim, attention_dim):
        super().__init__()
        self.encoder_proj = nn.Linear(feature_dim, attention_dim)
        self.decoder_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, features, h):
        scores = self.score(torch.tanh(self.encoder_proj(features) + self.decoder_proj(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(scores.float(), dim=1)
        return (features * alpha.unsqueeze(2).to(features.dtype)).sum(dim=1), alpha


class ReferenceDecoder(nn.Module):
    def __init__(self, vocab_size, feature_dim, embed_dim, hidden_dim, attention_dim, dropout):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.attention = Attention(feature_dim, hidden_dim, attention_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.gate = nn.Linear(hidden_dim, feature_dim)
        self.lstm = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def forward(self, features, captions, pad_id=0):
        """features (N, R, D), captions (N, T) -> logits (N, T-1, V), alphas (N, T-1, R), zero after each end."""
        steps, order = (captions[:, 1:] != pad_id).sum(dim=1).sort(descending=True)
        features, captions, steps = features[order], captions[order], steps.tolist()
        mean = features.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        embedded = self.embedding(captions)
        logits = torch.zeros(len(steps), captions.shape[1] - 1, self.output.out_features, device=features.device)
        alphas = torch.zeros(len(steps), captions.shape[1] - 1, features.shape[1], device=features.device)
        for t in range(steps[0]):
            n = sum(s > t for s in steps)  # captions still running
            context, alpha = self.attention(features[:n], h[:n])  # the projection of the features, again
            context = torch.sigmoid(self.gate(h[:n])) * context
            h, c = self.lstm(torch.cat([embedded[:n, t], context.to(embedded.dtype)], dim=1), (h[:n], c[:n]))
            logits[:n, t] = self.output(self.dropout(h))
            alphas[:n, t] = alpha
        unsort = order.argsort()
        return logits[unsort], alphas[unsort]


class ReferenceCaptioner(nn.Module):
    def __init__(self, vocab_size, train_layer4=False, embed_dim=512, hidden_dim=512, attention_dim=512, dropout=0.5):
        super().__init__()
        self.encoder = ReferenceEncoder(train_layer4)
        self.decoder = ReferenceDecoder(vocab_size, 2048, embed_dim, hidden_dim, attention_dim, dropout)

    def forward(self, images, captions):
        """images (B, 3, H, W) uint8, captions (B, k, T): one row, and one encoder pass, per caption."""
        k = captions.shape[1]
        features = self.encoder(images.repeat_interleave(k, dim=0))  # (B*k, R, D)
        return self.decoder(features, captions.flatten(0, 1))
