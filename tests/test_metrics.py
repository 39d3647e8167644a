"""imcap's caption metrics equal pycocoevalcap's own COCOEvalCap on the same inputs."""

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import evaluate
import pytest
from helpers import ROOT, read_only, run_env

from imcap.metrics import METRIC_MODULE, caption_scores, java_available, ptb_tokenize

NAMES = {
    "Bleu_1": "bleu1",
    "Bleu_2": "bleu2",
    "Bleu_3": "bleu3",
    "Bleu_4": "bleu4",
    "METEOR": "meteor",
    "ROUGE_L": "rouge_l",
    "CIDEr": "cider",
}


@pytest.fixture(scope="module")
def caption_set(shared_data_module):
    """12 Flickr8k images with their 5 human captions; predictions of varying quality: another image's
    caption, a reference with words changed, a reference itself, and one whose PTB tokens differ from
    imcap's Python tokeniser's ("dog's", "ball,")."""
    references = defaultdict(list)
    with open(shared_data_module / "flickr8k" / "captions.txt", newline="") as f:
        for row in csv.DictReader(f):
            if len(references) < 12 or row["image"] in references:
                references[row["image"]].append(row["caption"])
    ids = list(references)[:12]
    predictions = {}
    for n, i in enumerate(ids):
        refs = references[i]
        predictions[i] = [
            references[ids[(n + 1) % 12]][0],
            refs[0].replace(" a ", " the "),
            refs[1],
            "The dog's red ball, in the grass!",
        ][n % 4]
    return predictions, {i: references[i] for i in ids}


@pytest.fixture(scope="module")
def shared_data_module():
    path = ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared real-data folder is needed for this test")
    return path


def coco_eval_scores(predictions, references):
    """pycocoevalcap's COCOEvalCap, as the papers ran it (SPICE left out: it downloads CoreNLP)."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    ids = {name: n for n, name in enumerate(sorted(references))}
    coco = COCO()
    coco.dataset = {
        "images": [{"id": n} for n in ids.values()],
        "annotations": [
            {"image_id": ids[i], "id": k * 10 + j, "caption": c}
            for k, i in enumerate(sorted(references))
            for j, c in enumerate(references[i])
        ],
    }
    coco.createIndex()
    results = coco.loadRes([{"image_id": ids[i], "caption": c} for i, c in predictions.items()])

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    original, coco_eval.Spice = coco_eval.Spice, NoSpice
    try:
        evaluator = coco_eval.COCOEvalCap(coco, results)
        evaluator.evaluate()
    finally:
        coco_eval.Spice = original
    return {NAMES[k]: v for k, v in evaluator.eval.items() if k in NAMES}


@pytest.fixture(scope="module")
def our_scores(caption_set):
    return caption_scores(*caption_set)


def test_every_metric_equals_coco_eval_cap(caption_set, our_scores):
    predictions, references = caption_set
    expected = coco_eval_scores(predictions, references)
    ours = our_scores
    assert set(expected) == set(ours) == set(NAMES.values())
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1 and ours["cider"] > 0  # a non-trivial set


def test_the_evaluate_module_loads_from_its_path_offline_and_gives_the_same_numbers(
    caption_set, our_scores, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    predictions, references = caption_set
    ids = sorted(predictions)
    metric = evaluate.load(METRIC_MODULE)
    scores = metric.compute(predictions=[predictions[i] for i in ids], references=[references[i] for i in ids])
    direct = our_scores
    assert scores.keys() == direct.keys()
    for name in scores:  # the same up to the order of floating-point sums
        assert scores[name] == pytest.approx(direct[name], rel=1e-12), name


def test_without_java_meteor_is_unavailable_and_the_others_still_score(tmp_path):
    script = (
        "import json; from imcap.metrics import caption_scores; "
        "print(json.dumps(caption_scores({'a': 'a dog runs', 'b': 'a red car'}, "
        "{'a': ['a dog runs', 'a dog is running'], 'b': ['a red car', 'a car that is red']})))"
    )
    env = {**run_env(), "PATH": str(Path(sys.executable).parent)}  # no java on this PATH
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["meteor"] is None and scores["bleu1"] == pytest.approx(1.0, abs=1e-6) and scores["cider"] > 0
    assert result.stderr.count("Java is not installed") == 1


def test_a_quick_score_skips_only_meteor_so_checkpoints_compare_by_the_same_numbers(caption_set, our_scores):
    if not java_available():
        pytest.skip("Java is not installed: both scores tokenise in Python")
    full, quick = our_scores, caption_scores(*caption_set, meteor=False)
    assert quick["meteor"] is None and full["meteor"] > 0
    assert {k: v for k, v in quick.items() if k != "meteor"} == {k: v for k, v in full.items() if k != "meteor"}


def test_mismatched_predictions_and_references_are_an_error():
    with pytest.raises(ValueError, match="must cover the same images"):
        caption_scores({"a": "x"}, {"b": ["x"]})


def test_a_line_break_inside_a_reference_leaves_every_image_its_own_references():
    if not java_available():
        pytest.skip("the PTB tokeniser needs Java")
    predictions = {1: "a man rides a bike", 2: "two cats sleep on a sofa"}
    spaced = caption_scores(
        predictions, {1: ["a man rides a bike down the road"], 2: ["two cats sleep on a sofa"]}, meteor=False
    )
    for brk in ("\r", "\u2028", "\x0b"):  # line breaks to Java's PTB tokeniser, which pycocoevalcap splits on "\n" only
        broken = {1: [f"a man rides a bike{brk}down the road"], 2: ["two cats sleep on a sofa"]}
        assert caption_scores(predictions, broken, meteor=False) == spaced, repr(brk)


TRICKY = {
    "a": ["A man's dog, running -- fast!", "Two (small) cats: on a sofa; sleeping...", "It's 5 o'clock"],
    "b": ['"Quoted" words `here\' and {braces}', "e-mail me at a.b@c.org?", "Ünïcödé café — naïve"],
}


def test_the_ptb_tokeniser_gives_the_official_wrappers_tokens():
    if not java_available():
        pytest.skip("the PTB tokeniser needs Java")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    official = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in TRICKY.items()})
    assert ptb_tokenize(TRICKY) == official


def test_scores_are_computed_when_pycocoevalcaps_own_directory_is_read_only(tmp_path):
    """The official wrapper writes its input file beside its jar; in a read-only site-packages that fails."""
    if not java_available():
        pytest.skip("the PTB tokeniser needs Java")
    import pycocoevalcap

    packages = tmp_path / "site-packages"
    shutil.copytree(Path(pycocoevalcap.__path__[0]), packages / "pycocoevalcap")
    script = (
        "import json, pycocoevalcap; from imcap.metrics import caption_scores; "
        "print(json.dumps([pycocoevalcap.__path__[0], caption_scores({'a': 'a dog runs'}, "
        "{'a': ['a dog runs', 'a dog is running']}, meteor=False)]))"
    )
    env = {**run_env(), "PYTHONPATH": os.pathsep.join([str(packages), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with read_only(packages / "pycocoevalcap" / "tokenizer"):
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    used, scores = json.loads(result.stdout.splitlines()[-1])
    assert used == str(packages / "pycocoevalcap") and scores["bleu1"] == pytest.approx(1.0, abs=1e-6)
