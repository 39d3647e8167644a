"""The model's contract: shapes, what trains and what stays frozen, weights loading, and that it learns."""

import pytest
import torch
import torchvision

from imcap.config import load_config
from imcap.data.batch import Images
from imcap.model import Captioner, caption_loss
from imcap.model.decoder import Decoder
from imcap.model.encoder import (
    EncoderCNN,
    WeightsError,
    estimate_batchnorm_stats,
    estimate_feature_stats,
    load_resnet50,
)
from imcap.train import make_optimizer

SMALL = [
    "model.encoder.weights=none",
    "model.decoder.embed_dim=16",
    "model.decoder.hidden_dim=32",
    "model.decoder.attention_dim=16",
]


def small_model(*overrides, vocab_size=12):
    cfg = load_config(None, [*SMALL, *overrides])
    return Captioner(cfg.model, vocab_size), cfg


def random_batch(batch=2, k=2, length=7, vocab_size=12, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    captions = torch.randint(4, vocab_size, (batch, k, length), generator=g)
    captions[:, :, 0] = 1  # <start>
    captions[:, :, -1] = 2  # <end>
    captions[0, 0, 4:] = 0  # one shorter caption: <end> then <pad>
    captions[0, 0, 3] = 2
    return images, captions


def test_encoder_turns_224px_images_into_49_regions_of_2048_features():
    encoder = EncoderCNN(weights="none").eval()
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    assert encoder(Images(images)).shape == (2, 49, 2048)


def test_frozen_encoder_gets_no_gradient_and_keeps_batchnorm_in_eval_mode():
    model, cfg = small_model()
    model.train()
    images, captions = random_batch()
    logits, alphas = model(captions, Images(images))
    caption_loss(logits, alphas, captions, 0, 1.0)[0].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert [g["name"] for g in make_optimizer(model, cfg, 10)[0].param_groups] == ["decoder"]


def test_train_layer4_trains_exactly_layer4_with_its_own_learning_rate():
    model, cfg = small_model("model.encoder.train_layer4=true", "train.lr=1e-3", "train.layer4_lr=1e-5")
    model.train()
    trainable = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.encoder.named_parameters() if n.startswith("cnn.7.")}  # cnn.7 is layer4
    images, captions = random_batch()
    logits, alphas = model(captions, Images(images))
    caption_loss(logits, alphas, captions, 0, 1.0)[0].backward()
    with_grad = {n for n, p in model.encoder.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    groups = {g["name"]: g for g in make_optimizer(model, cfg, 10)[0].param_groups}
    # the configured rates, which the schedule scales (initial_lr: LambdaLR keeps them there)
    assert groups["layer4"]["initial_lr"] == pytest.approx(1e-5) and groups["decoder"]["initial_lr"] == pytest.approx(
        1e-3
    )
    assert {id(p) for p in groups["layer4"]["params"]} == {id(p) for p in model.encoder.layer4.parameters()}
    assert model.encoder.layer4.training and not model.encoder.cnn[0].training  # layer4's BatchNorm trains


def test_loss_falls_when_trained_on_one_batch():
    torch.manual_seed(0)
    model, cfg = small_model("model.decoder.dropout=0.0", "model.decoder.hidden_dim=64", "model.decoder.embed_dim=32")
    images, captions = random_batch(batch=4, k=1)
    estimate_feature_stats(model.encoder, [Images(images)])  # untrained features saturate the decoder
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        logits, alphas = model(captions, Images(images))
        loss, xent = caption_loss(logits, alphas, captions, 0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(xent.item())
    assert losses[-1] < 0.3 * losses[0]


def test_loss_ignores_padding_and_attention_after_the_end():
    model, _ = small_model()
    images, captions = random_batch(batch=3, k=3)
    captions[1, 0, 3:] = torch.tensor([2, 0, 0, 0])  # a second short caption: 7 of 9 run past step 3
    # runs of steps round the captions computed up to an eighth of the batch (2): 8 run past step 3
    assert Decoder.schedule(captions).runs == [(9, 3), (8, 3)]
    logits, alphas = model(captions, Images(images))
    assert logits.shape == (9, 6, 12) and alphas.shape == (9, 6, 4)
    assert torch.all(alphas[0, 3:] == 0) and torch.all(alphas[3, 3:] == 0)  # the short captions end after 3 targets
    assert torch.allclose(alphas[1].sum(dim=1), torch.ones(6))
    changed = logits.detach().clone()
    changed[0, 3:] = 100.0  # logits at padded positions do not count
    assert caption_loss(changed, alphas, captions, 0, 1.0)[0].item() == pytest.approx(
        caption_loss(logits, alphas, captions, 0, 1.0)[0].item()
    )


def test_k_captions_share_one_encoding_and_match_one_caption_per_sample():
    torch.manual_seed(0)
    model, _ = small_model("model.decoder.dropout=0.0")
    images, captions = random_batch(batch=2, k=3)
    grouped, _ = model(captions, Images(images))
    one_by_one = torch.cat([model(captions[:, j : j + 1], Images(images))[0] for j in range(3)])
    order = torch.arange(6).view(2, 3).t().reshape(-1)  # (caption j of image i) at row i*3 + j
    # float32 kernels for 6 rows and for 2 round differently (2.5e-5 here on AVX-512); a caption given
    # another image's features differs by 0.3
    assert torch.allclose(grouped, one_by_one[order.argsort()], atol=1e-4)


def test_local_state_dict_weights_are_loaded(tmp_path):
    reference = torchvision.models.resnet50()
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "r50.pt")
    loaded = load_resnet50(str(tmp_path / "r50.pt"))
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)


def test_a_resnet50_with_another_classifier_loads_its_trunk(tmp_path):
    places = torchvision.models.resnet50(num_classes=365)  # fine-tuned elsewhere: the classifier is not used
    torch.save(places.state_dict(), tmp_path / "places365.pt")
    assert torch.equal(
        load_resnet50(str(tmp_path / "places365.pt")).layer4[2].conv3.weight, places.layer4[2].conv3.weight
    )


def test_a_file_that_is_not_a_resnet50_is_refused_by_name(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="other.pt is not a ResNet-50 state dict"):
        load_resnet50(str(tmp_path / "other.pt"))
    with pytest.raises(WeightsError, match="missing.pt does not exist"):
        load_resnet50(str(tmp_path / "missing.pt"))


def test_imagenet_weights_load_from_the_torch_home_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # any download attempt fails at once
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    name = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1]
    reference = torchvision.models.resnet50()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / name)
    assert torch.equal(load_resnet50("imagenet").fc.weight, reference.fc.weight)


def test_imagenet_weights_offline_and_not_cached_name_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsError) as error:
        load_resnet50("imagenet")
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert f"Place that file at {expected}" in str(error.value)
    expected.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet50().state_dict(), expected)
    expected.write_bytes(expected.read_bytes()[:100_000])  # an interrupted copy
    with pytest.raises(WeightsError, match=f"from {expected} .*the file is damaged"):
        load_resnet50("imagenet")


def test_feature_standardisation_gives_each_channel_zero_mean_and_unit_std():
    torch.manual_seed(0)
    encoder = EncoderCNN(weights="none").eval()
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    assert encoder(Images(images)).abs().max() > 10  # untrained features grow stage by stage
    assert estimate_feature_stats(encoder, [Images(images[:8]), Images(images[8:])]) == 16
    features = encoder(Images(images))  # (16, 4, 2048)
    live = encoder.feature_std > 1e-3
    assert torch.allclose(features.mean(dim=(0, 1))[live], torch.zeros(int(live.sum())), atol=1e-3)
    assert torch.allclose(features.std(dim=(0, 1), unbiased=False)[live], torch.ones(int(live.sum())), atol=1e-3)


@pytest.mark.parametrize("train_layer4", [False, True])
def test_estimating_feature_stats_leaves_batchnorm_statistics_and_the_mode_as_they_were(train_layer4):
    model, _ = small_model(f"model.encoder.train_layer4={str(train_layer4).lower()}")  # as train() builds it
    before = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    estimate_feature_stats(model.encoder, [Images(random_batch()[0])])
    after = model.encoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    frozen_norms = [m for m in model.encoder.frozen_part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.encoder.training and not any(m.training for m in frozen_norms)


def test_estimated_batchnorm_statistics_make_a_trained_layer4_see_the_same_features_in_train_and_eval_mode():
    model, _ = small_model("model.encoder.train_layer4=true")
    encoder = model.encoder.train()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, generator=g)
    frozen = encoder.frozen_features(images)

    def scale_ratio() -> float:  # layer4's output scale in eval mode over that in train mode
        with torch.no_grad():
            train_scale = encoder.layer4(frozen).std()
            encoder.layer4.eval()
            eval_scale = encoder.layer4(frozen).std()
            encoder.layer4.train()
        return (eval_scale / train_scale).item()

    assert scale_ratio() > 3  # torchvision's initial statistics: evaluation sees features many times larger
    assert estimate_batchnorm_stats(encoder, [images[:8], images[8:]]) == 16
    frozen = encoder.frozen_features(images)  # the frozen part's statistics are estimated too
    assert scale_ratio() == pytest.approx(1.0, abs=0.05)
    norms = [m for m in encoder.cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in norms)  # layer4 goes on tracking its statistics as it trains
    frozen_norms = [m for m in encoder.frozen_part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert encoder.training and not any(m.training for m in frozen_norms)


def test_training_an_untrained_layer4_without_estimated_batchnorm_statistics_is_refused_before_any_work():
    from imcap.config import ConfigError
    from imcap.encoder_setup import estimate_batchnorm

    model, cfg = small_model("model.encoder.train_layer4=true")  # loads: inference builds such models too
    with pytest.raises(ConfigError, match="batchnorm_stats_images"):
        estimate_batchnorm(model, None, cfg, None)  # refused before it reads data or touches the device
