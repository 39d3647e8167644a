"""Distributed evaluation, `imcap eval`, `imcap caption` with attention maps, and export."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, run_env, tiny_overrides, two_process_launch
from PIL import Image

from imcap.cli import main as imcap
from imcap.config import DataConfig, load_config
from imcap.data.demo import build_demo
from imcap.train import train


@pytest.fixture(scope="module")
def trained(demo_shards, tmp_path_factory):
    """A tiny model trained for one epoch on the demo shards, and a val split of odd size (31 images)."""
    runs = tmp_path_factory.mktemp("runs")
    train(
        load_config(
            ROOT / "configs" / "demo.yaml",
            tiny_overrides(demo_shards, runs, "eval.max_images=8", "eval.every_steps=5", "eval.meteor=last"),
        )
    )
    odd = build_demo(tmp_path_factory.mktemp("odd"), train_images=8, val_images=31, shard_samples=7)
    return runs / "tiny", odd


def run(*args, timeout=300):
    result = subprocess.run(args, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_evaluation_of_an_odd_split_equals_one_process(trained, tmp_path):
    model, odd = trained
    common = ["--split", "val", "--shards", str(odd), "--beam-size", "2", "--batch-size", "4", "--cpu"]
    run(sys.executable, "launch/evaluate.py", str(model), "--out", str(tmp_path / "one"), *common)
    run(
        *two_process_launch(),
        "launch/evaluate.py",
        str(model),
        "--out",
        str(tmp_path / "two"),
        *common,
    )
    one, two = (json.loads((tmp_path / d / "captions.json").read_text()) for d in ("one", "two"))
    assert len(one) == 31 and sorted(c["image_id"] for c in two) == [f"val_{i:06d}" for i in range(31)]
    assert sorted(one, key=lambda c: c["image_id"]) == sorted(two, key=lambda c: c["image_id"])
    scores_one, scores_two = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "two"))
    for name in ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "phrase_accuracy", "grounding", "exact"):
        assert scores_one[name] == scores_two[name] and scores_one[name] is not None  # the last three: a demo set
    assert scores_one["images"] == scores_two["images"] == 31
    assert scores_two["val_loss"] == pytest.approx(scores_one["val_loss"], rel=1e-5)


def test_caption_writes_an_attention_map_for_a_real_photo(trained, shared_data, tmp_path, capsys):
    model, _ = trained
    photo = shared_data / "photos" / "astronaut.png"
    assert imcap(["caption", str(photo), "--model", str(model), "--attention-maps", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip()
    words = line.split(": ", 1)[1].split()
    figure = Image.open(tmp_path / "astronaut.png")
    assert line.startswith(str(photo)) and words
    rows = -(-(len(words) + 1) // 6)  # the image, then a panel per word, six to a row
    assert figure.size == (min(len(words) + 1, 6) * 132 + 4, rows * 148 + 4)


def test_caption_json_lines_give_each_words_attention_over_the_grid(trained, demo_shards, tmp_path, capsys):
    model, odd = trained
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["tar", "xf", str(odd / "val-000000.tar"), "-C", str(images), "--wildcards", "*.png"], check=True)
    assert imcap(["caption", str(images), "--model", str(model), "--json", str(tmp_path / "out.jsonl")]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 7 and {r["file"] for r in records} == set(printed)
    for r in records:
        assert r["caption"] == printed[r["file"]] == " ".join(r["words"])
        assert r["grid"] == [2, 2] and len(r["attention"]) == len(r["words"])  # 64 px: a 2 x 2 grid
        assert all(len(row) == 4 and sum(row) == pytest.approx(1.0, abs=1e-3) for row in r["attention"])


def test_training_logs_captions_and_attention_figures_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, _ = trained
    events = EventAccumulator(str(model / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    images, texts = events.Tags()["images"], [t for t in events.Tags()["tensors"] if t.startswith("captions/")]
    assert sorted(images) == [f"attention/val_{i:06d}" for i in range(4)]  # eval.tensorboard_samples=4
    assert sorted(texts) == [f"captions/val_{i:06d}/text_summary" for i in range(4)]
    assert [e.step for e in events.Images("attention/val_000000")] == [5, 10, 12]  # every evaluation
    figure = events.Images("attention/val_000000")[-1]
    assert figure.width > 132 and figure.height >= 148
    text = events.Tensors("captions/val_000000/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "references:" in text and "at the" in text


def test_exported_model_gives_the_same_captions_as_its_run(trained, tmp_path, capsys):
    model, odd = trained
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["tar", "xf", str(odd / "val-000000.tar"), "-C", str(images), "--wildcards", "*.png"], check=True)
    assert imcap(["export", str(model), "--out", str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "config.yaml",
        "model.safetensors",
        "vocab.json",
    ]
    capsys.readouterr()
    assert imcap(["caption", str(images), "--model", str(model)]) == 0
    from_run = capsys.readouterr().out
    assert imcap(["caption", str(images), "--model", str(tmp_path / "exported")]) == 0
    assert capsys.readouterr().out == from_run and from_run.count("\n") == 7


def test_training_logs_every_metric_of_its_evaluations(trained):
    model, _ = trained
    evaluations = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines() if '"split"' in line]
    expected = {"val_loss", "bleu1", "bleu4", "rouge_l", "cider", "meteor", "phrase_accuracy", "grounding", "exact"}
    assert evaluations and all(expected <= set(e) for e in evaluations)
    assert [e["step"] for e in evaluations] == [5, 10, 12]
    assert [e["meteor"] is None for e in evaluations] == [True, True, False]  # eval.meteor=last


def test_caption_reads_a_phone_photo_upright_as_viewers_show_it(shared_data, tmp_path):
    from imcap.caption import _picture

    upright = Image.open(shared_data / "photos" / "chelsea.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show": how phones store portrait shots
    upright.transpose(Image.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    assert torch.equal(_picture(tmp_path / "phone.png", 64), _picture(tmp_path / "upright.png", 64))


def test_caption_skips_an_unreadable_file_naming_it_and_maps_files_of_one_name_apart(
    trained, shared_data, tmp_path, capsys, caplog
):
    model, _ = trained
    for folder, photo in (("a", "chelsea.png"), ("b", "coffee.png")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cat.png").write_bytes((shared_data / "photos" / photo).read_bytes())
    (tmp_path / "a" / "._cat.png").write_bytes(b"\0\5\26\7 macOS metadata, not an image")
    maps = tmp_path / "maps"
    assert (
        imcap(
            ["caption", str(tmp_path / "a"), str(tmp_path / "b"), "--model", str(model), "--attention-maps", str(maps)]
        )
        == 0
    )
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in printed] == [
        str(tmp_path / "a" / "cat.png"),
        str(tmp_path / "b" / "cat.png"),
    ]
    assert str(tmp_path / "a" / "._cat.png") in caplog.text
    assert sorted(p.name for p in maps.iterdir()) == ["cat-2.png", "cat.png"]


def test_evaluation_keeps_cocos_integer_image_ids_for_cocos_tools(trained, shared_data, tmp_path):
    import io

    import webdataset as wds
    from accelerate import Accelerator

    from imcap.config import EvalConfig
    from imcap.data.batch import Collate
    from imcap.evaluation import Evaluator
    from imcap.inference import load_for_inference

    model_dir, _ = trained
    photo = io.BytesIO()
    Image.open(shared_data / "photos" / "coffee.png").convert("RGB").resize((64, 64)).save(photo, format="PNG")
    with wds.TarWriter(str(tmp_path / "val-000000.tar")) as tar:
        for key, image_id in (("a", 391895), ("b", "flickr_1000"), ("c", 7)):
            tar.write(
                {
                    "__key__": key,
                    "png": photo.getvalue(),
                    "json": json.dumps({"image_id": image_id, "captions": ["a cup of coffee"]}).encode(),
                }
            )
    model, vocab, cfg = load_for_inference(model_dir)
    evaluator = Evaluator(
        [str(tmp_path / "val-000000.tar")],
        Collate(vocab, 20, 1),
        Accelerator(cpu=True),
        EvalConfig(batch_size=2, max_length=5),
        data=DataConfig(image_size=64),
        alpha_c=0.0,
    )
    assert [s["image_id"] for s in evaluator(model, meteor=False)["samples"]] == [7, 391895, "flickr_1000"]


def test_attention_figure_wraps_panels_into_rows_with_each_words_heat_on_its_region():
    from imcap.caption import attention_figure

    picture = torch.zeros(3, 64, 64, dtype=torch.uint8)  # black: the heat alone colours a panel
    words = [f"w{i}" for i in range(8)]
    alphas = torch.full((8, 4), 0.01)
    alphas[torch.arange(8), torch.arange(8) % 4] = 0.97  # word i looks at region i % 4
    figure = attention_figure(picture, words, alphas, panel=64, columns=3)
    assert figure.size == (3 * 68 + 4, 3 * 84 + 4)  # 9 panels: 3 rows of 3
    pixels = torch.from_numpy(np.asarray(figure).copy()).permute(2, 0, 1).float()
    for i in range(8):
        row, col = divmod(i + 1, 3)  # panel 0 is the image
        x, y = 4 + col * 68, 4 + row * 84 + 16
        red = pixels[0, y : y + 64, x : x + 64]
        quadrants = torch.stack(
            [red[:32, :32].mean(), red[:32, 32:].mean(), red[32:, :32].mean(), red[32:, 32:].mean()]
        )
        assert quadrants.argmax().item() == i % 4
