"""The embedded demo dataset: synthetic scenes of one or two shapes that need attention to caption.

A scene is a 2 x 2 grid of cells; one or two cells hold a shape with a size (2), a colour (6) and a
kind (3: a square, a wide bar, a tall pillar). At 128 px the encoder's grid is 4 x 4, 2 x 2 regions per
cell. The captions name every shape with its attributes, in reading order, with and without places:

    a large red bar at the top left and a small blue pillar at the bottom right
    there is a large red bar and a small blue pillar

There are 7,920 scenes. The val scenes are distinct and never drawn in train, so no val caption of
the first form was seen in training; train draws the others in a shuffled order, each again
(rendered anew) once all were drawn.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imcap.data.shards import write_split
from imcap.text import VOCAB_FILE, Vocabulary

SIZES = ("small", "large")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "white": (235, 235, 235),
    "purple": (150, 60, 200),
}
KINDS = ("square", "bar", "pillar")  # a square, a wide and a tall rectangle
PLACES = ("at the top left", "at the top right", "at the bottom left", "at the bottom right")  # reading order
TRAIN_IMAGES, VAL_IMAGES, IMAGE_SIZE, SHARD_SAMPLES = 5000, 500, 128, 625
MAX_SHAPES = 2


def all_scenes() -> list[tuple]:
    """Every scene: for each cell (reading order) None or (size, colour, kind); one to MAX_SHAPES shapes."""
    shapes = list(itertools.product(SIZES, COLOURS, KINDS))
    scenes = []
    for count in range(1, MAX_SHAPES + 1):
        for cells in itertools.combinations(range(len(PLACES)), count):
            for chosen in itertools.product(shapes, repeat=count):
                placed = dict(zip(cells, chosen))
                scenes.append(tuple(placed.get(cell) for cell in range(len(PLACES))))
    return scenes


def captions_for(scene: tuple) -> list[str]:
    """The scene's two captions: its shapes in reading order with their places, and by name only.

    One order only: with both orders as references, which shape comes first is a coin toss that greedy
    decoding answers with a mix of both shapes' words."""
    shapes = [
        (f"a {size} {colour} {kind}", PLACES[cell])
        for cell, (size, colour, kind) in ((c, s) for c, s in enumerate(scene) if s is not None)
    ]
    in_reading_order = " and ".join(f"{p} {where}" for p, where in shapes)
    names_only = "there is " + " and ".join(p for p, _ in shapes)
    return [in_reading_order, names_only]


def render(scene: tuple, size: int, rng: random.Random) -> Image.Image:
    np_rng = np.random.default_rng(rng.getrandbits(32))
    background = rng.randint(0, 60)
    pixels = np.clip(background + np_rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    cell = size / 2
    for index, shape in enumerate(scene):
        if shape is None:
            continue
        shape_size, colour, kind = shape
        r = cell * (0.42 if shape_size == "large" else 0.24)
        row, col = divmod(index, 2)
        cx = cell * (col + 0.5 + rng.uniform(-0.1, 0.1))
        cy = cell * (row + 0.5 + rng.uniform(-0.1, 0.1))
        fill = tuple(int(np.clip(c + rng.randint(-15, 15), 0, 255)) for c in COLOURS[colour])
        half_width, half_height = {"square": (r, r), "bar": (r, 0.35 * r), "pillar": (0.35 * r, r)}[kind]
        draw.rectangle([cx - half_width, cy - half_height, cx + half_width, cy + half_height], fill=fill)
    return image


def _samples(split: str, scenes: list[tuple], size: int, seed: int):
    rng = random.Random(f"{seed}-{split}-render")
    for i, scene in enumerate(scenes):
        png = io.BytesIO()
        render(scene, size, rng).save(png, format="PNG")
        captions = captions_for(scene)
        key = f"{split}_{i:06d}"
        yield {
            "__key__": key,
            "png": png.getvalue(),
            "txt": captions[0].encode(),
            "json": json.dumps({"image_id": key, "captions": captions}).encode(),
        }


def build_demo(
    out_dir: str | Path,
    train_images: int = TRAIN_IMAGES,
    val_images: int = VAL_IMAGES,
    image_size: int = IMAGE_SIZE,
    shard_samples: int = SHARD_SAMPLES,
    seed: int = 0,
    min_word_count: int = 1,
) -> Path:
    """Write train and val shards of the demo set (deterministic in all arguments), sizes.json and,
    last, the vocabulary of the train captions."""
    out_dir = Path(out_dir)
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    if val_images >= len(scenes):
        raise ValueError(f"the demo has {len(scenes)} scenes: {val_images} val images leave none for training")
    # val: distinct scenes never drawn in train; train: the others, drawn again (a new rendering) when asked for more
    train = list(itertools.islice(itertools.cycle(scenes[val_images:]), train_images))
    splits = {"val": scenes[:val_images], "train": train}
    for split, split_scenes in splits.items():
        write_split(_samples(split, split_scenes, image_size, seed), out_dir, split, shard_samples)
    train_captions = [c for scene in splits["train"] for c in captions_for(scene)]
    Vocabulary.build(train_captions, min_word_count).save(out_dir / VOCAB_FILE)  # written last: marks completion
    return out_dir


def demo_exists(out_dir: str | Path) -> bool:
    return (Path(out_dir) / VOCAB_FILE).exists()
