"""Self-critical training: the CIDEr-D reward against pycocoevalcap, sampling, the SCST gradient against a
per-sample reference in float64, and a 2-process SCST run resumed after kill -9 against an uninterrupted one."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    BEFORE_STEP,
    ROOT,
    kill_9,
    logged,
    run_env,
    start_ranks,
    stopped,
    stopping_at,
    tiny_overrides,
    wait_all,
    wait_for,
)
from pycocoevalcap.cider.cider import Cider
from safetensors.torch import load_file

from imcap.checkpoint import latest_checkpoint
from imcap.config import ScstConfig, load_config
from imcap.data.batch import Batch, CachedFeatures
from imcap.model import Captioner
from imcap.model.decoding import Sampling, sample_captions
from imcap.objectives import SelfCritical, caption_ids, sampler_seed
from imcap.rewards import FREQUENCIES_FILE, CiderD, DocumentFrequencies, document_frequencies
from imcap.text import Vocabulary, tokenize

REFERENCES = [
    ["A dog runs on the grass.", "a brown dog is running", "The dog plays!"],
    ["a man rides a red bike down a hill", "A person on a bicycle.", "man riding a bike"],
    ["two cats sleep", "Cats on a sofa, sleeping together in the sun"],
]
# (caption, whether it ended, its image): repeated words, longer than every reference, empty (no word, or
# only <end>), a reference itself, one word, a word the references lack (<unk>), cut off at the length limit
CAPTIONS = [
    ("a dog dog dog runs", True, 0),
    ("a man rides a bike down the hill on a red bike and a man rides a bike down the hill", False, 1),
    ("", False, 2),
    ("", True, 2),
    ("man riding a bike", True, 1),
    ("cats", True, 2),
    ("the the the", True, 0),
    ("a <unk> on a sofa", True, 2),
    ("a", False, 1),
]


def vocabulary() -> Vocabulary:
    """All caption words, but not every reference word: "sun", "together" are reference words it lacks."""
    return Vocabulary.build([c for c, _, _ in CAPTIONS] + REFERENCES[0] + REFERENCES[1] + ["two cats on a sofa"], 1)


def coco_cider(caption: str, image: int) -> float:
    """pycocoevalcap's CIDEr-D of one caption, its document frequencies from all REFERENCES, on the same words:
    tokenised references and a final <end> where the reward counts one."""
    gts = {i: [" ".join([*tokenize(r), "<end>"]) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [caption if i == image else "x"] for i in gts}
    return float(Cider().compute_score(gts, res)[1][image])


def caption_tokens(vocab: Vocabulary, caption: str, ended: bool) -> np.ndarray:
    return np.array([vocab.index[w] for w in caption.split()] + ([vocab.end] if ended else []), dtype=np.int64)


def test_the_reward_equals_pycocoevalcaps_cider_d_of_every_caption():
    vocab = vocabulary()
    reward = CiderD(document_frequencies(REFERENCES, vocab), vocab)
    ids = [caption_tokens(vocab, c, ended) for c, ended, _ in CAPTIONS]
    images = np.array([image for _, _, image in CAPTIONS])
    scores = reward(ids, images, reward.encode_references(REFERENCES))
    expected = [coco_cider(" ".join([*c.split(), *(["<end>"] if ended else [])]), i) for c, ended, i in CAPTIONS]
    assert np.abs(scores - expected).max() < 1e-6, (scores, expected)
    assert scores[2] == scores[3] == 0.0 and scores[4] > 2.0  # empty: 0; a reference itself: the most
    one_by_one = [reward([c], np.array([0]), reward.encode_references([REFERENCES[i]]))[0] for c, i in zip(ids, images)]
    assert np.array_equal(scores, one_by_one)  # a caption's reward does not depend on its batch


def test_document_frequencies_count_images_and_survive_a_save(tmp_path):
    vocab = vocabulary()
    frequencies = document_frequencies(REFERENCES, vocab)
    assert frequencies.images == 3 and {"sun", "together"} <= set(frequencies.extra_words)
    dog = (vocab.index["dog"] + 1) << 0  # the unigram "dog": in three references of one image, counted once
    assert frequencies.lookup(np.array([dog]))[0] == 1
    frequencies.save(tmp_path / FREQUENCIES_FILE)
    loaded = DocumentFrequencies.load(tmp_path / FREQUENCIES_FILE)
    assert np.array_equal(loaded.codes, frequencies.codes) and np.array_equal(loaded.counts, frequencies.counts)
    assert (loaded.images, loaded.extra_words, loaded.vocabulary_size) == (3, frequencies.extra_words, len(vocab))


def small_model(vocab_size: int, dtype=torch.float32) -> Captioner:
    torch.manual_seed(0)
    overrides = ["model.encoder.weights=none", "model.decoder.dropout=0.0"]
    overrides += [f"model.decoder.{k}_dim={n}" for k, n in (("embed", 8), ("hidden", 16), ("attention", 8))]
    return Captioner(load_config(None, overrides).model, vocab_size).to(dtype)


def features(dtype=torch.float32) -> CachedFeatures:
    return CachedFeatures(torch.randn(3, 2048, 2, 2, generator=torch.Generator().manual_seed(1), dtype=dtype))


def sampled(model, vocab, seed, n=4):
    sampling = Sampling(n, 8, vocab.start, vocab.end, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sample_captions(model.decoder, model.encoder(features()), sampling)


def test_sampling_with_a_seed_repeats_and_each_rank_samples_its_own():
    vocab = vocabulary()
    model = small_model(len(vocab))
    first, again = (sampled(model, vocab, sampler_seed(0, rank=0)) for _ in range(2))
    other_rank = sampled(model, vocab, sampler_seed(0, rank=1))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.tokens, other_rank.tokens)
    assert first.tokens.shape[0] == 12 and (first.tokens[:, 0] != vocab.end).all()  # 3 images x 4; none empty
    # the mask holds each caption's words and the <end> that ended it, nothing after
    lengths = first.mask.sum(dim=1)
    for row, length in zip(first.tokens, lengths):
        assert (row[length:] == vocab.end).all() and (row[: length - 1] != vocab.end).all()


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_the_scst_gradient_equals_a_per_sample_reference_in_float64(baseline):
    vocab = vocabulary()
    reward = CiderD(document_frequencies(REFERENCES, vocab), vocab)
    model = small_model(len(vocab), torch.float64)
    cfg = ScstConfig(samples_per_image=4, baseline=baseline, max_length=8)
    batch = Batch(torch.zeros(3, 1, 2, dtype=torch.long), features(torch.float64), REFERENCES, [0, 1, 2])
    loss, _ = SelfCritical(cfg, reward, vocab, torch.Generator().manual_seed(5))(model, batch)
    loss.backward()
    objective_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()

    # the reference: the same samples, each scored and teacher-forced alone, step by step
    samples = sample_captions(
        model.decoder,
        model.encoder(batch.inputs),
        Sampling(4, 8, vocab.start, vocab.end, generator=torch.Generator().manual_seed(5)),
    )
    references = reward.encode_references(REFERENCES)
    rewards = np.array(
        [
            [
                reward([ids], np.array([0]), [references[i]])[0]
                for ids in caption_ids(samples.tokens[4 * i : 4 * i + 4], samples.mask[4 * i : 4 * i + 4])
            ]
            for i in range(3)
        ]
    )
    total = 0.0
    for image in range(3):
        if baseline == "greedy":
            greedy = greedy_ids(model, batch.inputs, image, vocab)
            base = [reward([greedy], np.array([0]), [references[image]])[0]] * 4
        else:
            base = [(rewards[image].sum() - rewards[image, j]) / 3 for j in range(4)]
        for j in range(4):
            ids = caption_ids(
                samples.tokens[4 * image + j : 4 * image + j + 1], samples.mask[4 * image + j : 4 * image + j + 1]
            )[0]
            total = total - (rewards[image, j] - base[j]) * sequence_logprob(model, batch.inputs, image, ids, vocab)
    (total / 12).backward()
    reference_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(objective_grads) == len(reference_grads) > 0
    for ours, theirs in zip(objective_grads, reference_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    assert max(g.abs().max().item() for g in objective_grads) > 0


def sequence_logprob(model, inputs, image, ids, vocab) -> torch.Tensor:
    """log p(ids) of one image's caption, step by step; the first step without <end>, as the sampler draws."""
    decoder = model.decoder
    features_, projected = decoder.prepare(model.encoder(inputs)[image : image + 1])
    h, c = decoder.init_state(features_)
    word, total = torch.tensor([vocab.start]), 0.0
    for t, next_word in enumerate(ids.tolist()):
        h, c, _ = decoder.step(features_, projected, decoder.embedding(word), h, c)
        logits = decoder.output(h)
        if t == 0:
            logits = logits.index_fill(1, torch.tensor([vocab.end]), float("-inf"))
        total = total + logits.log_softmax(dim=1)[0, next_word]
        word = torch.tensor([next_word])
    return total


def greedy_ids(model, inputs, image, vocab) -> np.ndarray:
    from imcap.model.decoding import greedy_decode

    tokens = greedy_decode(model, CachedFeatures(inputs.features[image : image + 1]), vocab.start, vocab.end, 8).tokens[
        0
    ]
    return np.array(tokens + ([vocab.end] if len(tokens) < 8 else []), dtype=np.int64)


def scst_overrides(shards, runs, *extra):
    """Self-critical training on 2 processes, an epoch of 6 steps, sampler and dropout on, data workers."""
    return tiny_overrides(
        shards,
        runs,
        "train.cpu=true",
        "train.objective=scst",
        "train.lr=5e-4",
        "train.log_every=1",
        "checkpoint.every_steps=2",
        "data.num_workers=2",
        "model.decoder.dropout=0.3",
        "scst.samples_per_image=3",
        "scst.max_length=10",
        "eval.max_images=8",
        *extra,
    )


@pytest.fixture(scope="module")
def cross_entropy_run(demo_shards, tmp_path_factory):
    """The first stage: one epoch of cross-entropy on one process."""
    runs = tmp_path_factory.mktemp("xent")
    command = [sys.executable, "launch/train.py", "--config", "configs/demo.yaml"]
    done = subprocess.run(
        [*command, *tiny_overrides(demo_shards, runs, "train.cpu=true")], cwd=ROOT, env=run_env(), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return runs / "tiny"


def test_a_2_process_scst_run_resumed_after_kill_9_ends_with_bitwise_the_weights_of_an_uninterrupted_one(
    demo_shards, tmp_path, cross_entropy_run
):
    start = f"train.init_from={cross_entropy_run}"
    reference = scst_overrides(demo_shards, tmp_path, "run_name=reference", start)
    assert wait_all(start_ranks(reference, log=tmp_path / "reference")) == [0, 0], (
        tmp_path / "reference.rank0"
    ).read_text()[-3000:]
    interrupted = scst_overrides(demo_shards, tmp_path, "run_name=interrupted", start)
    procs = start_ranks(interrupted, log=tmp_path / "log", command=stopping_at(BEFORE_STEP.format(done=5)))
    wait_for(lambda: all(stopped(p) for p in procs), procs)
    kill_9(procs)
    run = tmp_path / "interrupted"
    assert latest_checkpoint(run).name == "step-000004"  # resumed 4 batches into the epoch, step 5 trained again
    assert (latest_checkpoint(run) / FREQUENCIES_FILE).is_file()
    logged_before = len(logged(run))
    assert wait_all(start_ranks(interrupted, log=tmp_path / "log")) == [0, 0], (tmp_path / "log.rank0").read_text()[
        -3000:
    ]

    first_log = (tmp_path / "reference.rank0").read_text()
    assert f"starting from the weights of {cross_entropy_run / 'checkpoints'}" in first_log
    assert "starting from the weights" not in (tmp_path / "log.rank0").read_text().split("resumed from")[-1]
    weights = [
        load_file(tmp_path / name / "checkpoints" / "step-000006" / "model.safetensors")
        for name in ("reference", "interrupted")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    initial = load_file(cross_entropy_run / "checkpoints" / "step-000012" / "model.safetensors")
    assert not all(torch.equal(initial[k], weights[0][k]) for k in initial)  # SCST trained
    expected = {r["step"]: r for r in logged(tmp_path / "reference")}
    after_resume = logged(run)[logged_before:]
    assert [r["step"] for r in after_resume] == [5, 6]
    for r in after_resume:  # the same samples, rewards and dropout as the uninterrupted run's
        assert {k: r[k] for k in ("reward", "train_loss", "bad_endings")} == {
            k: expected[r["step"]][k] for k in ("reward", "train_loss", "bad_endings")
        }
    logged_keys = set(expected[6])
    assert {"reward", "baseline", "reward_std", "caption_length", "bad_endings"} <= logged_keys


def test_init_from_a_run_takes_its_best_checkpoint_or_its_latest_when_best_is_unusable(cross_entropy_run, tmp_path):
    from imcap.resume import _init_checkpoint

    run = tmp_path / "run"
    shutil.copytree(cross_entropy_run, run)
    shutil.copytree(run / "checkpoints" / "step-000012", run / "checkpoints" / "step-000006")  # an older one
    (run / "checkpoints" / "best").write_text('{"name": "step-000006", "metric": "cider", "value": 1.0}')
    assert _init_checkpoint(str(run)) == run / "checkpoints" / "step-000006"  # the best, not the latest
    for best in ('{"name": "step-000099", "metric": "cider", "value": 1.0}', "{not json"):
        (run / "checkpoints" / "best").write_text(best)
        assert _init_checkpoint(str(run)) == run / "checkpoints" / "step-000012"  # the latest
    assert _init_checkpoint(str(run / "checkpoints" / "step-000012")) == run / "checkpoints" / "step-000012"
