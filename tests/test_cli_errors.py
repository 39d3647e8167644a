"""Every command's errors as a user meets them: a real `imcap` (or launch script) process given a bad config, a
missing or broken file, prints one line `imcap: ...` naming it to stderr and exits 2, with no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT, run_env, tiny_overrides, two_process_launch
from PIL import Image
from safetensors.torch import save_file

from imcap.checkpoint import contiguous_state
from imcap.config import load_config, save_config
from imcap.data.shards import ShardWriter
from imcap.model import Captioner
from imcap.text import Vocabulary


@pytest.fixture(scope="module")
def model_dir(demo_shards, tmp_path_factory) -> Path:
    """An export directory (model.safetensors, vocab.json, config.yaml) of an untrained tiny model of the
    demo shards: what eval, caption and export read."""
    out = tmp_path_factory.mktemp("model")
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(demo_shards, out / "runs"))
    vocab = Vocabulary.load(demo_shards / "vocab.json")
    save_file(contiguous_state(Captioner(cfg.model, len(vocab), vocab.pad)), out / "model.safetensors")
    vocab.save(out / "vocab.json")
    save_config(cfg, out / "config.yaml")
    return out


def model_with(model_dir: Path, copy: Path, name: str, content: bytes | None) -> Path:
    """copy: a copy of model_dir with its file `name` replaced by content, or removed (None)."""
    shutil.copytree(model_dir, copy)
    if content is None:
        (copy / name).unlink()
    else:
        (copy / name).write_bytes(content)
    return copy


def imcap(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m imcap.cli ARGS`, or `python launch/X.py ARGS` when the first is a launch script."""
    script = ["-m", "imcap.cli"] if not str(args[0]).startswith("launch/") else []
    command = [sys.executable, *script, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str | Path) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, f"exit {result.returncode}, stderr:\n{result.stderr[-3000:]}"
    assert lines[0].startswith("imcap: "), lines[0]
    for text in named:
        assert str(text) in lines[0], f"{text} is not named in: {lines[0]}"


@pytest.fixture(scope="module")
def bad(model_dir, demo_shards, tmp_path_factory) -> SimpleNamespace:
    """The bad inputs of the cases, made once: missing, broken and looping files beside good ones."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "twice.yaml").write_text("train:\n  lr: 1e-3\nrun_name: x\ntrain:\n  epochs: 2\n")
    (tmp / "loop-a").symlink_to(tmp / "loop-b")
    (tmp / "loop-b").symlink_to(tmp / "loop-a")
    Image.new("RGB", (64, 64), "red").save(tmp / "red.png")
    shutil.copytree(demo_shards, tmp / "bad-sizes")
    (tmp / "bad-sizes" / "sizes.json").write_text("{not json")
    cut_short = (model_dir / "model.safetensors").read_bytes()[:999]
    wider = (model_dir / "config.yaml").read_text().replace("hidden_dim: 32", "hidden_dim: 48").encode()
    return SimpleNamespace(
        tmp=tmp,
        model=model_dir,
        shards=demo_shards,
        empty=tmp / "empty",
        tiny=tiny_overrides(demo_shards, tmp / "runs", "train.cpu=true"),
        cut_short=model_with(model_dir, tmp / "cut-short", "model.safetensors", cut_short),
        no_vocab=model_with(model_dir, tmp / "no-vocab", "vocab.json", None),
        bad_vocab=model_with(model_dir, tmp / "bad-vocab", "vocab.json", b"{"),
        other_shape=model_with(model_dir, tmp / "other-shape", "config.yaml", wider),
        bad_config=model_with(model_dir, tmp / "bad-config", "config.yaml", b"train: [1, 2\n"),
    )


DEMO = ["--config", "configs/demo.yaml"]

# case -> (the command's arguments, what its error line names), from the bad inputs
CASES = {
    "train: unknown key": lambda b: (["train", *DEMO, "train.bogus=1"], ["train.bogus"]),
    "launch/train.py: unknown key": lambda b: (["launch/train.py", *DEMO, "train.bogus=1"], ["train.bogus"]),
    "train: a section written twice": lambda b: (
        ["train", "--config", b.tmp / "twice.yaml"],
        [b.tmp / "twice.yaml", "train is written twice, at lines 1 and 4"],
    ),
    "train: a negative seed": lambda b: (["train", *DEMO, "train.seed=-1"], ["train.seed"]),
    "train: no shards of the split": lambda b: (
        ["train", *DEMO, *b.tiny, f"data.shards={b.empty}"],
        [b.empty, "split 'train'"],
    ),
    "train: sizes.json not JSON": lambda b: (
        ["train", *DEMO, *b.tiny, f"data.shards={b.tmp / 'bad-sizes'}"],
        [b.tmp / "bad-sizes" / "sizes.json"],
    ),
    "train: encoder weights missing": lambda b: (
        ["train", *DEMO, *b.tiny, f"model.encoder.weights={b.tmp / 'no.pt'}"],
        ["model.encoder.weights", b.tmp / "no.pt"],
    ),
    "train: init_from not a run or checkpoint": lambda b: (
        ["train", *DEMO, *b.tiny, "train.objective=scst", f"train.init_from={b.empty}"],
        [f"train.init_from={b.empty}", "not a complete checkpoint directory"],
    ),
    "features build: no shards": lambda b: (
        ["features", "build", *DEMO, *b.tiny, f"data.shards={b.empty}"],
        [b.empty, "split 'train'"],
    ),
    "features build: shards at a URL, no --out": lambda b: (
        ["features", "build", *DEMO, *b.tiny, "data.shards=http://127.0.0.1:9/demo"],
        ["data.shards=http://127.0.0.1:9/demo", "--out"],
    ),
    "eval: no model": lambda b: (["eval", b.empty, "--cpu"], [b.empty, "no model found"]),
    "launch/evaluate.py: no model": lambda b: (["launch/evaluate.py", b.empty, "--cpu"], [b.empty, "no model found"]),
    "eval: no such split": lambda b: (["eval", b.model, "--split", "test", "--cpu"], [b.shards, "split 'test'"]),
    "eval: model cut short": lambda b: (["eval", b.cut_short, "--cpu"], [b.cut_short / "model.safetensors"]),
    "caption: weights of another shape": lambda b: (
        ["caption", b.tmp / "red.png", "--model", b.other_shape],
        [b.other_shape / "model.safetensors", "does not fit the model", "size mismatch"],
    ),
    "eval: config.yaml not YAML": lambda b: (
        ["eval", b.bad_config, "--cpu"],
        [b.bad_config / "config.yaml", "is not valid YAML"],
    ),
    "eval: vocab.json not a vocabulary": lambda b: (
        ["eval", b.bad_vocab, "--cpu"],
        [b.bad_vocab / "vocab.json", "is not an imcap vocabulary"],
    ),
    "caption: no such image": lambda b: (["caption", b.tmp / "no.png", "--model", b.model], [b.tmp / "no.png"]),
    "caption: a symlink loop": lambda b: (
        ["caption", b.tmp / "loop-a", "--model", b.model],
        [b.tmp / "loop-a", "symbolic link loop"],
    ),
    "caption: --json in a directory that is not there": lambda b: (
        ["caption", b.tmp / "red.png", "--model", b.model, "--json", b.empty / "no" / "out.jsonl"],
        [f"cannot write {b.empty / 'no' / 'out.jsonl'}: no such file or directory"],
    ),
    "caption: no vocab.json": lambda b: (
        ["caption", b.tmp / "red.png", "--model", b.no_vocab],
        [b.no_vocab, "vocab.json missing"],
    ),
    "export: no vocab.json": lambda b: (
        ["export", b.no_vocab, "--out", b.tmp / "exported"],
        [b.no_vocab, "vocab.json missing"],
    ),
    "export: no model": lambda b: (["export", b.empty, "--out", b.tmp / "exported"], [b.empty, "no model found"]),
    "shards build: no captions file": lambda b: (
        ["shards", "build", "flickr", b.tmp / "out", "--captions", b.tmp / "no.txt", "--images", b.tmp]
        + ["--split", "train", b.tmp / "no-list.txt", "--workers", "1"],
        [b.tmp / "no.txt"],
    ),
    "shards check: no shards": lambda b: (["shards", "check", b.empty, "--workers", "1"], [b.empty]),
}


@pytest.fixture(scope="module")
def outcomes(bad) -> dict[str, tuple[subprocess.CompletedProcess, list]]:
    """Every case's process and what its line names: two processes at a time, each training case in a run
    directory of its own (they would otherwise meet at its lock)."""

    def run(index_and_case):
        index, case = index_and_case
        args, named = CASES[case](bad)
        if args[0] in ("train", "launch/train.py", "features"):
            args = [*args, f"runs_dir={bad.tmp / f'runs-{index}'}"]
        return case, (imcap(*args), named)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, enumerate(CASES)))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_naming_it_and_exit_2(case, outcomes):
    result, named = outcomes[case]
    assert_one_line_error(result, *named)


def test_every_process_of_a_launch_reports_a_config_error_in_one_line(tmp_path):
    command = [*two_process_launch(), "launch/train.py", "--config", "configs/demo.yaml", "train.bogus=1"]
    result = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    reports = [line for line in output.splitlines() if "train.bogus" in line]
    # the launcher adds its own report of the failed processes; the processes print no traceback
    assert result.returncode != 0 and reports and "ConfigError" not in output, output[-3000:]
    for line in reports:
        assert line.startswith("imcap: config error: unknown config key train.bogus; allowed keys in train:"), line


def test_an_error_in_a_data_worker_is_one_line_of_the_error_as_raised_there(tmp_path):
    """torch re-raises a worker's error with the worker's traceback as its message: the line keeps only the error."""
    for split in ("train", "val"):
        with ShardWriter(tmp_path / "shards", split, max_samples=4) as writer:
            for i in range(8):
                writer.write({"__key__": f"{split}{i}", "png": b"\x89PNG cut short", "txt": f"a picture {i}".encode()})
    in_a_worker = ["data.num_workers=1", "data.batch_size=2", "model.encoder.train_layer4=false"]
    overrides = tiny_overrides(tmp_path / "shards", tmp_path / "runs", "train.cpu=true", *in_a_worker)
    result = imcap("train", *DEMO, *overrides, "model.encoder.batchnorm_stats_images=0")
    last = result.stderr.splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith(f"imcap: no usable sample in {tmp_path / 'shards' / 'train-000000.tar'}, "), last
    assert last.endswith("remove or rebuild these shards (in DataLoader worker process 0)"), last
