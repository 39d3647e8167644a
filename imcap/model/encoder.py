"""EncoderCNN: torchvision's ResNet-50 without pooling and classifier, as a grid of region features."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from imcap.data.batch import CachedFeatures, Images
from imcap.errors import ImcapError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ImcapError, RuntimeError):
    pass


def load_resnet50(weights: str) -> nn.Module:
    """`imagenet` (torchvision's weights, from the TORCH_HOME cache or downloaded), `none`, or a state-dict path."""
    resnet = torchvision.models.resnet50(weights=None)
    if weights == "none":
        return resnet
    if weights == "imagenet":
        state = _imagenet_state_dict()
    else:
        state = _local_state_dict(Path(weights))
    classifier = {k: v.shape for k, v in resnet.fc.state_dict(prefix="fc.").items()}
    state = {k: v for k, v in state.items() if k not in classifier or v.shape == classifier[k]}  # e.g. Places365's
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]  # the classifier is dropped anyway
    if missing or unexpected:
        raise WeightsError(
            f"{weights} is not a ResNet-50 state dict: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return resnet


def _imagenet_state_dict() -> dict:
    enum = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline: URLError, socket errors, proxies refusing
        if cached.is_file():  # an interrupted copy, or another file under the name
            raise WeightsError(
                f"could not load the ImageNet ResNet-50 weights from {cached} ({type(e).__name__}: "
                f"{e}): the file is damaged; replace it with {enum.url}"
            ) from None
        raise WeightsError(
            f"could not load the ImageNet ResNet-50 weights: {cached} is not there and downloading "
            f"{enum.url} failed ({type(e).__name__}: {e}). Place that file at {cached} (the directory "
            f"follows $TORCH_HOME), or set model.encoder.weights to a local state-dict path or to none."
        ) from None


def _local_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(
            f"model.encoder.weights: {path} does not exist (expected imagenet, none, "
            "or the path of a ResNet-50 state dict)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path} could not be loaded as a state dict of tensors: {e}") from None
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
    return {k.removeprefix("module."): v for k, v in state.items()}


def grid_shape(regions: int) -> tuple[int, int]:
    """(rows, columns) of a feature grid of `regions` regions in reading order: the images are square crops."""
    side = round(regions**0.5)
    if side * side != regions:
        raise ValueError(f"{regions} regions are not a square grid")
    return side, side


class EncoderCNN(nn.Module):
    """images (B, 3, H, W) uint8 -> features (B, H/32 * W/32, 2048); (B, 49, 2048) at 224 px.

    The "frozen part" (everything, or everything before layer4 when layer4 trains) runs without
    gradients and keeps its BatchNorm layers in eval mode. Its output can be cached and fed back
    as CachedFeatures, skipping decoding and most of the encoder.
    """

    feature_dim = 2048

    def __init__(self, weights: str = "imagenet", train_layer4: bool = False, channels_last: bool = True):
        super().__init__()
        resnet = load_resnet50(weights)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.cnn = nn.Sequential(*list(resnet.children())[:-2]).to(memory_format=self.memory_format)  # no avgpool, fc
        self.train_layer4 = train_layer4
        self.cnn.requires_grad_(False)
        if train_layer4:
            self.layer4.requires_grad_(True)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # per-channel standardisation of the output features: identity until estimate_feature_stats
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_std", torch.ones(self.feature_dim))
        self.train()  # the frozen part's BatchNorm in eval mode from the start

    @property
    def layer4(self) -> nn.Module:
        return self.cnn[-1]

    @property
    def frozen_part(self) -> nn.Module:
        return self.cnn[:-1] if self.train_layer4 else self.cnn

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen_part.eval()  # frozen BatchNorm keeps its running statistics
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.mean.dtype) / 255.0 - self.mean) / self.std  # (B, 3, H, W)
        return x.contiguous(memory_format=self.memory_format)

    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen part's output: (B, 1024, H/16, W/16) with train_layer4, else (B, 2048, H/32, W/32)."""
        with torch.no_grad():
            return self.frozen_part(self.normalize(images))

    def forward(self, inputs: Images | CachedFeatures) -> torch.Tensor:
        """-> features (B, R, 2048), standardised per channel."""
        if isinstance(inputs, Images):
            x = self.frozen_features(inputs.pixels)
        else:  # a cache holds bf16 or fp16: compute in the model's dtype
            x = inputs.features.to(self.feature_mean.dtype).contiguous(memory_format=self.memory_format)
        if self.train_layer4:
            x = self.layer4(x)  # (B, 2048, h, w)
        features = x.flatten(2).transpose(1, 2)  # (B, h*w, 2048)
        return (features - self.feature_mean) / self.feature_std


@torch.no_grad()
def estimate_batchnorm_stats(encoder: EncoderCNN, image_batches) -> int:
    """Set every BatchNorm's running mean and variance from `image_batches` of (B, 3, H, W) uint8 images
    (a pass in train mode without gradients, averaging over all batches). Returns the number of images.

    An untrained ResNet-50 (`weights: none`) keeps torchvision's initial statistics (mean 0, variance 1),
    so its eval-mode activations grow stage by stage to values in the hundreds, and a trained layer4 in
    train mode (batch statistics) sees other inputs than the same layer4 in eval mode: its captioner
    learns nothing that evaluation can use. Estimated statistics make both modes agree.
    """
    norms = [m for m in encoder.cnn.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches, not an exponential one
    was_training = encoder.training
    encoder.cnn.train()
    images = 0
    for batch in image_batches:
        encoder.cnn(encoder.normalize(batch))
        images += len(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum  # a trained layer4 keeps tracking its statistics as it changes
    encoder.train(was_training)
    return images


@torch.no_grad()
def estimate_feature_stats(encoder: EncoderCNN, batches) -> int:
    """Set the per-channel mean and std that standardise the encoder's features, from `batches` of
    model inputs (Images or CachedFeatures). Returns the number of images seen.

    Untrained (`weights: none`) ResNet-50 features grow stage by stage to values in the hundreds,
    which saturate the decoder; standardised, they keep what the untrained network preserves.
    """
    encoder.feature_mean.zero_()
    encoder.feature_std.fill_(1.0)
    was_training = encoder.training
    encoder.eval()  # BatchNorm on its running statistics, left as they are
    total, total_sq, count, images = 0.0, 0.0, 0, 0
    for inputs in batches:
        features = encoder(inputs).double()  # (B, R, D)
        total = total + features.sum(dim=(0, 1))
        total_sq = total_sq + (features**2).sum(dim=(0, 1))
        count += features.shape[0] * features.shape[1]
        images += features.shape[0]
    mean = total / count
    std = (total_sq / count - mean**2).clamp(min=0).sqrt()
    encoder.feature_mean.copy_(mean.float())
    encoder.feature_std.copy_(std.float().clamp(min=1e-3))  # dead channels stay zero, not inf
    encoder.train(was_training)
    return images
