"""The sample format, read by training, evaluation, the shard check, the feature cache and captioning.

A sample is img2dataset-style: `key.jpg|jpeg|png|webp` + `key.json` ({"captions": [...]} or
{"caption": "..."}, and optionally "image_id") and/or `key.txt`. A feature-cache sample holds
`key.safetensors` instead of an image, or, for a source sample it could not encode, only `key.json`
with {"skipped_in_cache": reason}, so that reading the cache skips and counts it as reading the images
would. Decoding turns a sample into a `Sample`; one that cannot be used raises `SampleError`, and the
reader skips and counts it.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from imcap.text import tokenize

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIPPED_IN_CACHE = "skipped_in_cache"  # the JSON field of a feature cache's marker for a sample it could not encode
Image.MAX_IMAGE_PIXELS = 16384 * 16384  # larger is treated as a decompression bomb: skipped, counted


class SampleError(ValueError):
    """A sample that cannot be used (no image, undecodable image, no caption): skipped and counted."""


@dataclass(frozen=True)
class JpegFile:
    """A JPEG left for the training process to decode on its device, with its crop from the header."""

    data: torch.Tensor  # (bytes,) uint8
    box: tuple[int, int, int, int]  # crop_box: resized width, height, left, top
    size: int  # the crop's side


@dataclass(frozen=True)
class Sample:
    """A decoded sample: its id, its captions and exactly one of pixels, cached features or a JPEG."""

    image_id: str | int
    captions: list[str]
    pixels: torch.Tensor | None = None  # (3, S, S) uint8
    features: torch.Tensor | None = None  # (C, h, w), the frozen encoder part's output
    jpeg: JpegFile | None = None


def open_image(data: bytes) -> Image.Image:
    """Image.open, with an image over Image.MAX_IMAGE_PIXELS an error (PIL only warns up to twice that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def decode_image(data: bytes, image_size: int) -> Image.Image:
    """Image bytes -> RGB PIL image, drafted down (JPEG) towards image_size where the format allows."""
    image = open_image(data)
    image.draft("RGB", (image_size, image_size))  # JPEG decodes at 1/2, 1/4, 1/8 scale when that suffices
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale, don't clip
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / (256.0 if array.max() > 255 else 1.0), 0, 255).astype(np.uint8))
    if image.mode in ("P", "LA", "RGBA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # composite on white, not on whatever the transparent pixels hold
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def crop_box(width: int, height: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    """Where an image of width x height goes: shorter side resized to `size`, then a size x size crop
    (random when rng is given, else centred). -> (resized width, resized height, left, top)."""
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    if rng:
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return w, h, left, top


def resize_crop(image: Image.Image, size: int, rng: random.Random | None) -> torch.Tensor:
    """-> (3, size, size) uint8, placed by crop_box; normalisation happens on the device, inside the encoder."""
    return place(image, crop_box(*image.size, size, rng), size)


def place(image: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The image resized and cropped as `box` says: (3, size, size) uint8."""
    w, h, left, top = box
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, S, S)


def jpeg_for_device(data: bytes, size: int, rng: random.Random | None) -> JpegFile | None:
    """A JPEG for the device decoder, cropped from its header alone; None for what that decoder does
    not take (not a JPEG, CMYK, 16-bit...) and for a JPEG without its end marker: nvJPEG decodes a
    truncated file without an error, PIL refuses it."""
    image = open_image(data)  # reads the header; a bad one raises, and the sample is skipped
    complete = data.rstrip(b"\0").endswith(b"\xff\xd9")
    if image.format not in ("JPEG", "MPO") or image.mode not in ("RGB", "L") or not complete:
        return None
    return JpegFile(torch.frombuffer(bytearray(data), dtype=torch.uint8), crop_box(*image.size, size, rng), size)


def skipped_sample(key: str, reason: str) -> dict:
    """A feature cache's marker for a source sample it could not encode."""
    return {"__key__": key, "json": json.dumps({SKIPPED_IN_CACHE: reason}).encode()}


def sample_captions(sample: dict) -> list[str]:
    """The captions of a raw sample that hold a word: its JSON's "captions" or "caption", else its txt."""
    captions: list[str] = []
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and SKIPPED_IN_CACHE in meta:
            raise SampleError(f"skipped when the cache was built: {meta[SKIPPED_IN_CACHE]}")
        found = meta.get("captions", meta.get("caption", [])) if isinstance(meta, dict) else []
        captions = [found] if isinstance(found, str) else found if isinstance(found, list) else []  # null: img2dataset
    if not captions and "txt" in sample:
        captions = [sample["txt"].decode("utf-8")]
    captions = [c.strip() for c in captions if isinstance(c, str) and tokenize(c)]  # "...": no training target
    if not captions:
        raise SampleError("no caption")
    return captions


def image_id(sample: dict) -> str | int:
    """The JSON's image_id (an integer stays one: COCO's tools match results to images by integer id), else the key."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and "image_id" in meta:
            found = meta["image_id"]
            return found if isinstance(found, int) and not isinstance(found, bool) else str(found)
    return sample["__key__"]


def decode_sample(sample: dict, image_size: int, rng: random.Random | None, jpeg_on_device: bool = False) -> Sample:
    """A raw tar sample (extension -> bytes) -> Sample; rng places a random crop (None: centred)."""
    try:
        captions, found_id = sample_captions(sample), image_id(sample)
        if "safetensors" in sample:
            return Sample(found_id, captions, features=load_safetensors(sample["safetensors"])["features"])
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise SampleError(f"no image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        if jpeg_on_device and (jpeg := jpeg_for_device(sample[ext], image_size, rng)):
            return Sample(found_id, captions, jpeg=jpeg)
        return Sample(found_id, captions, pixels=resize_crop(decode_image(sample[ext], image_size), image_size, rng))
    except SampleError:
        raise
    except Exception as e:  # PIL errors, bad UTF-8, bad JSON, decompression bombs
        raise SampleError(f"{type(e).__name__}: {e}") from None
