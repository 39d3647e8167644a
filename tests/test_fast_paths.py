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
from imcap.model.decoding import greedy_decode

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


@pytest.mark.parametrize("train_layer4, dropout", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_static_shape_step_equals_the_shrinking_step_and_the_straightforward_step(train_layer4, dropout):
    """Every caption at every step, masked after its end: the same loss and gradients. With dropout, the
    same masks fall on the same captions (both run longest first), so the two imcap steps still agree."""
    fast, reference = models(train_layer4)
    fast.decoder.dropout.p = dropout
    images, captions = batch()
    assert fast.decoder.schedule(captions, 0, static=True).runs == [(12, 8)]
    results = {}
    for static in (False, True):
        fast.static_shapes = static
        torch.manual_seed(5)
        results[static] = loss_and_grads(fast, captions, Images(images), captions=captions)
    if not dropout:
        results["reference"] = loss_and_grads(reference, images, captions, captions=captions)
    loss, grads = results[True]
    for other_loss, other_grads in (results[k] for k in results if k is not True):
        assert loss == pytest.approx(other_loss, rel=1e-12)
        for name in grads:
            assert torch.allclose(grads[name], other_grads[name], rtol=1e-7, atol=1e-10), name


def test_greedy_decoding_over_every_step_gives_the_captions_of_stopping_at_the_last_end():
    fast, _ = models(False)
    fast.eval()
    with torch.no_grad():  # <end> likely enough that every caption ends well before max_length
        fast.decoder.output.bias[2] = 0.4
    images, _ = batch()
    decoded = {}
    for static in (False, True):
        fast.static_shapes = static
        decoded[static] = greedy_decode(fast, Images(images), 1, 2, 30)
    assert decoded[True].tokens == decoded[False].tokens and all(len(t) < 29 for t in decoded[True].tokens)
    assert torch.equal(decoded[True].logprobs, decoded[False].logprobs)
