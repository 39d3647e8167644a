"""imcap's fast training step (one encoder pass per image shared by its k captions, projection once per
batch, output layer after the recurrence; or cached encoder features) computes the same loss and
gradients as the straightforward step of bench/reference.py on the same batch."""

import sys

import pytest
import torch
from helpers import ROOT

from imcap.config import load_config
from imcap.data.batch import CachedFeatures, Images
from imcap.model import Captioner, caption_loss

sys.path.insert(0, str(ROOT / "bench"))
from reference import ReferenceCaptioner  # noqa: E402

VOCAB = 20


def models(train_layer4: bool):
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "model.encoder.weights=none",
            "model.decoder.embed_dim=16",
            "model.decoder.hidden_dim=32",
            "model.decoder.attention_dim=24",
            "model.decoder.dropout=0.0",
            f"model.encoder.train_layer4={str(train_layer4).lower()}",
        ],
    )
    fast = Captioner(cfg.model, VOCAB).train()
    with torch.no_grad():  # standardised features, as training uses them
        fast.encoder.feature_mean.normal_()
        fast.encoder.feature_std.uniform_(5.0, 20.0)
    reference = ReferenceCaptioner(VOCAB, train_layer4, 16, 32, 24, 0.0).train()
    reference.load_state_dict(fast.state_dict())
    # float64: the two orders of summation then agree to ~1e-13; in float32, BatchNorm's backward through
    # an untrained ResNet's large activations leaves layer4's gradients only ~1% apart
    return fast.double(), reference.double()


def batch(k=3):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g)
    captions = torch.randint(4, VOCAB, (4, k, 9), generator=g)
    captions[:, :, 0] = 1
    for i, length in enumerate(torch.randint(3, 9, (4 * k,), generator=g).tolist()):  # captions of varied length
        row = captions.view(-1, 9)[i]
        row[length] = 2
        row[length + 1 :] = 0
    return images, captions


def loss_and_grads(model, *inputs, captions):
    model.zero_grad()
    logits, alphas = model(*inputs)
    loss, _ = caption_loss(logits, alphas, captions, 0, alpha_c=1.0)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train_layer4", [False, True])
def test_grouped_captions_step_equals_the_straightforward_step(train_layer4):
    fast, reference = models(train_layer4)
    images, captions = batch()
    fast_loss, fast_grads = loss_and_grads(fast, captions, Images(images), captions=captions)
    ref_loss, ref_grads = loss_and_grads(reference, images, captions, captions=captions)
    assert fast_loss == pytest.approx(ref_loss, rel=1e-12)
    assert (
        fast_grads.keys() == ref_grads.keys() and any(n.startswith("encoder.cnn.7") for n in fast_grads) == train_layer4
    )
    for name in fast_grads:
        assert torch.allclose(fast_grads[name], ref_grads[name], rtol=1e-7, atol=1e-10), name


@pytest.mark.parametrize("train_layer4", [False, True])
def test_cached_feature_step_equals_the_straightforward_step(train_layer4):
    fast, reference = models(train_layer4)
    images, captions = batch()
    cached = fast.encoder.frozen_features(images)  # what `imcap features build` stores (here in fp32)
    assert cached.shape == ((4, 1024, 4, 4) if train_layer4 else (4, 2048, 2, 2))
    fast_loss, fast_grads = loss_and_grads(fast, captions, CachedFeatures(cached), captions=captions)
    ref_loss, ref_grads = loss_and_grads(reference, images, captions, captions=captions)
    assert fast_loss == pytest.approx(ref_loss, rel=1e-12)
    for name in fast_grads:
        assert torch.allclose(fast_grads[name], ref_grads[name], rtol=1e-7, atol=1e-10), name
