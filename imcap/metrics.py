"""Caption metrics as the papers compute them: the coco-caption reference code (pycocoevalcap).

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D after PTB tokenisation, exactly as `COCOEvalCap` computes
them. METEOR and the PTB tokeniser run on Java: without Java, METEOR is reported as unavailable and
a Python tokeniser that mimics PTB's lower-casing and punctuation removal stands in (the BLEU,
ROUGE-L and CIDEr-D numbers can then differ slightly from the papers'). SPICE is not computed: it needs
Stanford CoreNLP models downloaded at first use.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from imcap.text import tokenize

log = logging.getLogger(__name__)
METRIC_MODULE = str(Path(__file__).parent / "caption_metrics")  # for evaluate.load(METRIC_MODULE)


@cache
def java_available() -> bool:
    java = shutil.which("java")
    if java is None:
        log.warning(
            "Java is not installed: METEOR is unavailable and a Python tokeniser replaces "
            "the PTB tokeniser (install a JRE, e.g. openjdk-17-jre-headless, for paper-exact numbers)"
        )
        return False
    try:
        subprocess.run([java, "-version"], capture_output=True, check=True, timeout=60)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("Java does not run (%s): METEOR is unavailable, using a Python tokeniser", e)
        return False


def temp_dir() -> str:
    """Where the PTB tokeniser's input file goes: the system's temporary directory (TMPDIR)."""
    return tempfile.gettempdir()


def _tokenize(captions: dict[str, list[str]], java: bool) -> dict[str, list[str]]:
    if java:
        # one line per caption: the wrapper replaces only "\n", Java also breaks lines at \r, \u2028, \v...,
        # which shifted every later caption onto the image before it; whitespace is all the same to PTB
        return ptb_tokenize({k: [" ".join(c.split()) for c in v] for k, v in captions.items()})
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer.tokenize, the same command and the same output, but its input file is
    written to temp_dir(): the official wrapper writes it beside its jar, into site-packages, which a
    read-only environment refuses."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    image_ids = [k for k, v in captions.items() for _ in v]
    sentences = "\n".join(c.replace("\n", " ") for v in captions.values() for c in v)
    with tempfile.NamedTemporaryFile(dir=temp_dir(), prefix="imcap-ptb-", delete=False) as f:
        f.write(sentences.encode())
    try:
        cmd = ["java", "-cp", ptb.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer"]
        jar_dir = os.path.dirname(os.path.abspath(ptb.__file__))
        out = subprocess.run([*cmd, "-preserveLines", "-lowerCase", f.name], cwd=jar_dir, stdout=subprocess.PIPE)
    finally:
        os.remove(f.name)
    tokenized: dict[str, list[str]] = {}
    for k, line in zip(image_ids, out.stdout.decode().split("\n")):
        tokenized.setdefault(k, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return tokenized


def caption_scores(predictions: dict, references: dict, meteor: bool = True) -> dict[str, float | None]:
    """predictions {image_id: caption}, references {image_id: [captions]} -> {metric: score or None}.

    Scores are on the 0-1 scale of pycocoevalcap (CIDEr-D on its own, larger scale); a metric that
    cannot run here is None. meteor=False skips METEOR (a Java process of several seconds) for a fast
    score; the tokenisation is the same either way, so the other scores compare across calls.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = set(predictions) ^ set(references)
    if missing:
        raise ValueError(
            f"predictions and references must cover the same images; {len(missing)} differ, "
            f"e.g. {sorted(map(str, missing))[:3]}"
        )
    if not predictions:
        raise ValueError("no predictions to score")
    ids = sorted(predictions, key=str)
    java = java_available()
    gts = _tokenize({i: list(references[i]) for i in ids}, java)
    res = _tokenize({i: [predictions[i]] for i in ids}, java)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float | None] = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["meteor"] = _meteor(gts, res) if java and meteor else None
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _meteor(gts, res) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    return float(Meteor().compute_score(gts, res)[0])  # the Java process ends with the object
