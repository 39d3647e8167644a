"""The Show, Attend and Tell captioner: ResNet-50 encoder, soft attention, LSTM decoder, decoding."""

from imcap.model.captioner import Captioner, caption_loss

__all__ = ["Captioner", "caption_loss"]
