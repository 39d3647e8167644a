"""The captioner: EncoderCNN + Decoder, and its training loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imcap.config import ModelConfig
from imcap.data.batch import CachedFeatures, Images
from imcap.model.decoder import Decoder
from imcap.model.decoding import Sampling, sample_captions
from imcap.model.encoder import EncoderCNN


class Captioner(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.static_shapes = False  # train.static_shapes: set by the trainer (prepare_model)
        enc, dec = cfg.encoder, cfg.decoder
        self.encoder = EncoderCNN(enc.weights, enc.train_layer4, enc.channels_last)
        self.decoder = Decoder(
            vocab_size, EncoderCNN.feature_dim, dec.embed_dim, dec.hidden_dim, dec.attention_dim, dec.dropout
        )

    def forward(self, captions: torch.Tensor | None, inputs: Images | CachedFeatures, sampling: Sampling | None = None):
        """Teacher forcing: captions (B, k, T) token ids; inputs: images (B, 3, H, W) uint8 or cached encoder
        features. -> logits (B*k, T-1, V), alphas (B*k, T-1, R).

        With `sampling` (and captions None): captions sampled from the model instead -> SampledCaptions.
        Sampling goes through forward too: DDP all-reduces the gradients only of what its forward computed."""
        if sampling is not None:
            return sample_captions(self.decoder, self.encoder(inputs), sampling, stop_early=not self.static_shapes)
        # the shrinking schedule waits for the device: it is made before the encoder's work is queued
        schedule = self.decoder.schedule(captions, self.pad_id, static=self.static_shapes)
        features = self.encoder(inputs)  # (B, R, 2048)
        return self.decoder(features, captions, schedule, self.pad_id)

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups: the decoder, and layer4 when it trains."""
        groups = {"decoder": list(self.decoder.parameters())}
        if self.encoder.train_layer4:
            groups["layer4"] = list(self.encoder.layer4.parameters())
        return groups


def caption_loss(
    logits: torch.Tensor, alphas: torch.Tensor, captions: torch.Tensor, pad_id: int, alpha_c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over real (non-pad) tokens + alpha_c * the doubly stochastic attention penalty.

    captions (B, k, T); the penalty pushes each region's attention, summed over the caption's real
    steps, towards 1 (Xu et al. 2015, eq. 14), averaged over regions and captions. Computed in float32.
    Returns (loss, cross-entropy).
    """
    targets = captions.flatten(0, 1)[:, 1:]  # (N, T-1)
    xent = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id)
    if alpha_c == 0:
        return xent, xent
    real = (targets != pad_id).unsqueeze(2)  # (N, T-1, 1)
    attention_sums = (alphas.float() * real).sum(dim=1)  # (N, R)
    penalty = ((1.0 - attention_sums) ** 2).mean()
    return xent + alpha_c * penalty, xent
