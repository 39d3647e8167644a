"""Greedy and beam search on a small random model (fixed seeds, so every case is the same each run)."""

import pytest
import torch

from imcap.config import load_config
from imcap.data.batch import CachedFeatures
from imcap.model import Captioner
from imcap.model.decoding import beam_search, greedy_decode

START, END, VOCAB = 1, 2, 30


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    cfg = load_config(
        None,
        [
            "model.encoder.weights=none",
            "model.decoder.embed_dim=16",
            "model.decoder.hidden_dim=32",
            "model.decoder.attention_dim=16",
        ],
    )
    return Captioner(cfg.model, VOCAB).eval()


@pytest.fixture(scope="module")
def frozen():
    return torch.randn(6, 2048, 2, 2, generator=torch.Generator().manual_seed(0))  # cached encoder output


def sequence_logprob(model, frozen_one, tokens, ended=True) -> float:
    """The model's log-probability of <start> tokens (<end>), by teacher forcing."""
    ids = torch.tensor([[START, *tokens, *([END] if ended else [])]])
    logits, _ = model(ids.view(1, 1, -1), CachedFeatures(frozen_one))
    return logits.log_softmax(-1)[0].gather(1, ids[0, 1:].unsqueeze(1)).sum().item()


def test_beam_of_one_equals_greedy(model, frozen):
    greedy = greedy_decode(model, CachedFeatures(frozen), START, END, 12)
    beam = beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=1)
    assert beam.tokens == greedy.tokens
    assert torch.allclose(beam.logprobs, greedy.logprobs, atol=1e-4)
    assert any(len(t) < 12 for t in greedy.tokens) and any(len(t) == 12 for t in greedy.tokens)  # ended and not


def test_a_batch_gives_the_same_captions_as_one_image_at_a_time(model, frozen):
    batched = beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=4)
    for i in range(len(frozen)):
        alone = beam_search(model, CachedFeatures(frozen[i : i + 1]), START, END, 12, beam_size=4)
        assert alone.tokens[0] == batched.tokens[i]
        assert alone.logprobs[0].item() == pytest.approx(batched.logprobs[i].item(), abs=1e-4)


@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_larger_beams_never_find_a_less_likely_caption_than_greedy(model, frozen, beam_size):
    greedy = greedy_decode(model, CachedFeatures(frozen), START, END, 12)
    beam = beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=beam_size)
    assert torch.all(beam.logprobs >= greedy.logprobs - 1e-4)
    assert any(b != g for b, g in zip(beam.tokens, greedy.tokens))  # the search did find other captions


def test_reported_logprob_is_the_models_probability_of_the_caption(model, frozen):
    beam = beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=3)
    for i, tokens in enumerate(beam.tokens):
        expected = sequence_logprob(model, frozen[i : i + 1], tokens, ended=len(tokens) < 12)
        assert beam.logprobs[i].item() == pytest.approx(expected, abs=1e-3)


def test_a_model_that_never_ends_still_returns_captions_of_max_length(frozen):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.encoder.weights=none", "model.decoder.hidden_dim=32"])
    never_ends = Captioner(cfg.model, VOCAB).eval()
    with torch.no_grad():
        never_ends.decoder.output.bias[END] = -1e4
    for beam_size in (1, 3):
        out = beam_search(never_ends, CachedFeatures(frozen), START, END, 7, beam_size=beam_size)
        assert [len(t) for t in out.tokens] == [7] * len(frozen)
        assert all(a.shape == (7, 4) for a in out.alphas)
        assert out.logprobs[0].item() == pytest.approx(
            sequence_logprob(never_ends, frozen[:1], out.tokens[0], ended=False), abs=1e-3
        )


def test_length_penalty_favours_longer_captions(model, frozen):
    plain = beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=5)
    normalised = beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=5, length_penalty=1.0)
    lengths = [(len(p), len(n)) for p, n in zip(plain.tokens, normalised.tokens)]
    assert all(n >= p for p, n in lengths), lengths
    assert any(n > p for p, n in lengths), lengths  # seeds 3 and 0: three of the six images get a longer caption
    for i, (p, n) in enumerate(lengths):
        if n != p:  # each search kept the caption its own score prefers; both ended (<end> counts in the length)
            assert plain.logprobs[i] > normalised.logprobs[i]
            assert normalised.logprobs[i] / (n + 1) > plain.logprobs[i] / (p + 1)


def test_no_repeat_ngram_blocks_repeated_ngrams(model, frozen):
    for n in (1, 2):
        out = beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=3, no_repeat_ngram=n)
        for tokens in out.tokens:
            grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
            assert len(grams) == len(set(grams))


def test_attention_is_returned_for_every_word(model, frozen):
    for decoded in (
        greedy_decode(model, CachedFeatures(frozen), START, END, 12),
        beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=3),
    ):
        for tokens, alphas in zip(decoded.tokens, decoded.alphas):
            assert alphas.shape == (len(tokens), 4)
            assert torch.allclose(alphas.sum(dim=1), torch.ones(len(tokens)), atol=1e-5)


def test_no_search_returns_an_empty_caption_where_end_is_the_likeliest_first_word(model, frozen):
    with torch.no_grad():
        model.decoder.output.bias[END] += 4.0  # <end> first at step 0, as in a model that ends short captions early
    try:
        for beam_size in (1, 3, 5):
            out = beam_search(model, CachedFeatures(frozen), START, END, 12, beam_size=beam_size)
            assert all(out.tokens), beam_size
        assert all(greedy_decode(model, CachedFeatures(frozen), START, END, 12).tokens)
    finally:
        with torch.no_grad():
            model.decoder.output.bias[END] -= 4.0
