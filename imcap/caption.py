"""Captioning image files with a trained model, and pictures of where it looked for each word."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from imcap.checkpoint import load_for_inference
from imcap.data.pipeline import decode_image, resize_crop
from imcap.model.decoding import decode

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(paths: list[str]) -> list[Path]:
    """Files as given, and the images inside any directory, sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or directory")
    return files


@torch.no_grad()
def caption_files(model_path: str, paths: list[str], beam_size: int = 3, attention_maps: str | None = None,
                  batch_size: int = 16) -> list[tuple[Path, str]]:
    """-> (file, caption) for every image; with attention_maps, one PNG per image in that directory."""
    model, vocab, cfg = load_for_inference(model_path)
    size = cfg.data.image_size
    results, maps = [], set()
    files = image_files(paths)
    for start in range(0, len(files), batch_size):
        readable = [(f, picture) for f in files[start : start + batch_size] if (picture := _picture(f, size)) is not None]
        if not readable:
            continue
        chunk, pictures = zip(*readable)
        decoded = decode(model, vocab.start, vocab.end, cfg.eval.max_length, beam_size, images=torch.stack(pictures),
                         length_penalty=cfg.eval.length_penalty, no_repeat_ngram=cfg.eval.no_repeat_ngram)
        for f, picture, tokens, alphas in zip(chunk, pictures, decoded.tokens, decoded.alphas):
            caption = vocab.decode(tokens)
            results.append((f, caption))
            if attention_maps:
                out = Path(attention_maps)
                out.mkdir(parents=True, exist_ok=True)
                words = [vocab.words[t] for t in tokens]
                name, n = f.stem, 1
                while name in maps:  # cat.jpg beside cat.png, or a cat.jpg in two folders: a map for each
                    n += 1
                    name = f"{f.stem}-{n}"
                maps.add(name)
                attention_figure(picture, words, alphas).save(out / f"{name}.png")
    return results


def _picture(path: Path, size: int) -> torch.Tensor | None:
    """The file as the model sees it, (3, S, S) uint8, upright as photo viewers show it (phones store
    pixels sideways with an EXIF orientation); None, with a warning naming the file, if unreadable."""
    try:
        return resize_crop(ImageOps.exif_transpose(decode_image(path.read_bytes(), size)), size, None)
    except Exception as e:  # not an image after all (e.g. macOS ._ files), truncated, a decompression bomb
        log.warning("skipping %s: not a readable image (%s: %s)", path, type(e).__name__, e)
        return None


def attention_figure(picture: torch.Tensor, words: list[str], alphas: torch.Tensor, panel: int = 160) -> Image.Image:
    """The image, then one panel per word: the word's attention over the regions, upsampled and laid
    over the image as a heatmap, with the word under it. picture (3, S, S) uint8, alphas (words, R)."""
    image = Image.fromarray(picture.permute(1, 2, 0).numpy()).resize((panel, panel), Image.BILINEAR)
    grid = int(round(alphas.shape[1] ** 0.5)) if len(words) else 1
    label = 18
    figure = Image.new("RGB", ((len(words) + 1) * panel, panel + label), "white")
    figure.paste(image, (0, 0))
    draw = ImageDraw.Draw(figure)
    for i, (word, alpha) in enumerate(zip(words, alphas), start=1):
        weights = alpha.float().view(1, 1, grid, grid)
        weights = torch.nn.functional.interpolate(weights, size=(panel, panel), mode="bilinear", align_corners=False)[0, 0]
        weights = (weights / weights.max().clamp(min=1e-8)).numpy()
        heat = Image.fromarray(_heat_colours(weights))
        figure.paste(Image.blend(image, heat, 0.5), (i * panel, 0))
        draw.text((i * panel + 4, panel + 2), word, fill="black")
    return figure


def _heat_colours(weights: np.ndarray) -> np.ndarray:
    """0..1 -> dark blue .. red .. yellow, (H, W) -> (H, W, 3) uint8."""
    r = np.clip(2.0 * weights, 0, 1)
    g = np.clip(2.0 * weights - 1.0, 0, 1)
    b = np.clip(1.0 - 2.0 * weights, 0, 1) * 0.6
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)
