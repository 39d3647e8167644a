"""Captioning image files with a trained model, and pictures of where it looked for each word."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from imcap.data.batch import Images
from imcap.data.samples import SampleError, decode_image, decode_sample, resize_crop
from imcap.data.shards import read_shard
from imcap.errors import path_error
from imcap.inference import load_for_inference
from imcap.model.decoding import decode
from imcap.model.encoder import grid_shape

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_files(paths: list[str]) -> list[Path]:
    """Files as given, and the images inside any directory, sorted; a PathError for a path that is neither."""
    files = []
    for path in map(Path, paths):
        try:
            mode = path.stat().st_mode  # not is_dir/is_file: they answer False for a link loop, hiding why
            if S_ISDIR(mode):
                files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                continue
        except OSError as e:
            raise path_error(path, e, "image") from None
        if not S_ISREG(mode):
            raise path_error(path, "not a regular file or a directory", "image")
        files.append(path)
    return files


@torch.no_grad()
def caption_files(
    model_path: str,
    paths: list[str],
    beam_size: int = 3,
    attention_maps: str | None = None,
    json_lines: str | None = None,
    batch_size: int = 16,
) -> list[tuple[Path, str]]:
    """-> (file, caption) for every image; with attention_maps, one PNG per image in that directory; with
    json_lines, one JSON object per image in that file: file, caption, words, attention, grid."""
    files = image_files(paths)  # before the model loads: a path that is not there fails at once
    model, vocab, cfg = load_for_inference(model_path)
    size = cfg.data.image_size
    results, maps = [], set()
    # opened before any captioning: a path that cannot be written fails at once, and each line is written
    # as its image is done
    with contextlib.ExitStack() as stack:
        try:
            json_out = stack.enter_context(open(json_lines, "w")) if json_lines else None
            if attention_maps:
                Path(attention_maps).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise path_error(e.filename, e, "cannot write") from None
        for start in range(0, len(files), batch_size):
            readable = [
                (f, picture) for f in files[start : start + batch_size] if (picture := _picture(f, size)) is not None
            ]
            if not readable:
                continue
            chunk, pictures = zip(*readable)
            decoded = decode(
                model,
                Images(torch.stack(pictures)),
                vocab.start,
                vocab.end,
                cfg.eval.max_length,
                beam_size,
                cfg.eval.length_penalty,
                cfg.eval.no_repeat_ngram,
            )
            for f, picture, tokens, alphas in zip(chunk, pictures, decoded.tokens, decoded.alphas):
                caption, words = vocab.decode(tokens), [vocab.words[t] for t in tokens]
                results.append((f, caption))
                if json_out:
                    record = {
                        "file": str(f),
                        "caption": caption,
                        "words": words,
                        "attention": alphas.float().tolist(),
                        "grid": list(grid_shape(alphas.shape[1])),
                    }
                    json_out.write(json.dumps(record) + "\n")
                if attention_maps:
                    out = Path(attention_maps)
                    name, n = f.stem, 1
                    while name in maps:  # cat.jpg beside cat.png, or a cat.jpg in two folders: a map for each
                        n += 1
                        name = f"{f.stem}-{n}"
                    maps.add(name)
                    attention_figure(picture, words, alphas).save(out / f"{name}.png")
    return results


class AttentionSamples:
    """A few val images captioned at every evaluation, into TensorBoard through Accelerate's tracker: the
    generated caption and the references as text, the attention figure as an image. Read from the
    shards' images, so they show even when training reads a feature cache."""

    def __init__(self, shards: list[str], count: int, image_size: int):
        self.ids, self.pictures, self.references = [], [], []
        errors: list[str] = []
        for shard in shards if count else []:
            for sample in read_shard(shard, errors):
                try:
                    decoded = decode_sample(sample, image_size, None)
                except SampleError:
                    continue
                if decoded.pixels is not None:  # shards of cached features have no pictures to show
                    self.ids.append(decoded.image_id)
                    self.pictures.append(decoded.pixels)
                    self.references.append(decoded.captions)
                if len(self.ids) == count:
                    return

    @torch.no_grad()
    def log(self, model, vocab, accelerator, step: int, max_length: int) -> None:
        if not self.ids or not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(model)
        was_training = model.training
        model.eval()
        with accelerator.autocast():
            decoded = decode(
                model, Images(torch.stack(self.pictures).to(accelerator.device)), vocab.start, vocab.end, max_length
            )
        model.train(was_training)
        tracker = accelerator.get_tracker("tensorboard")
        for image_id, picture, tokens, alphas, references in zip(
            self.ids, self.pictures, decoded.tokens, decoded.alphas, self.references
        ):
            listed = "\n".join(f"- {r}" for r in references)
            accelerator.log(
                {f"captions/{image_id}": f"**{vocab.decode(tokens)}**\n\nreferences:\n\n{listed}"}, step=step
            )
            figure = attention_figure(picture, [vocab.words[t] for t in tokens], alphas)
            tracker.log_images({f"attention/{image_id}": np.asarray(figure)[None]}, step=step, dataformats="NHWC")


def _picture(path: Path, size: int) -> torch.Tensor | None:
    """The file as the model sees it, (3, S, S) uint8, upright as photo viewers show it (phones store
    pixels sideways with an EXIF orientation); None, with a warning naming the file, if unreadable."""
    try:
        return resize_crop(ImageOps.exif_transpose(decode_image(path.read_bytes(), size)), size, None)
    except Exception as e:  # not an image after all (e.g. macOS ._ files), truncated, a decompression bomb
        log.warning("skipping %s: not a readable image (%s: %s)", path, type(e).__name__, e)
        return None


def attention_figure(
    picture: torch.Tensor, words: list[str], alphas: torch.Tensor, panel: int = 128, columns: int = 6
) -> Image.Image:
    """The image, then one panel per word: its attention over the regions laid over the image as a
    heatmap, the region grid drawn, the word above. Panels wrap into rows of `columns`, so a long caption
    reads as a page, not a strip. picture (3, S, S) uint8, alphas (words, R)."""
    image = Image.fromarray(picture.permute(1, 2, 0).numpy()).resize((panel, panel), Image.BILINEAR)
    rows, cols = grid_shape(alphas.shape[1]) if len(words) else (1, 1)
    label, gap = 16, 4
    cell = (panel + gap, label + panel + gap)  # one panel with its word and the space around it
    count = len(words) + 1
    figure = Image.new("RGB", (min(count, columns) * cell[0] + gap, -(-count // columns) * cell[1] + gap), "white")
    draw = ImageDraw.Draw(figure)
    panels = [("(image)", image)]
    for word, alpha in zip(words, alphas):
        weights = alpha.float().view(1, 1, rows, cols)
        # nearest: each region's weight fills its own cells, so the grid cells stay visible
        weights = torch.nn.functional.interpolate(weights, size=(panel, panel), mode="nearest")[0, 0]
        heat = Image.fromarray(_heat_colours((weights / weights.max().clamp(min=1e-8)).numpy()))
        panels.append((word, Image.blend(image, heat, 0.55)))
    for i, (word, picture_panel) in enumerate(panels):
        x, y = gap + (i % columns) * cell[0], gap + (i // columns) * cell[1]
        draw.text((x + 2, y + 2), word, fill="black")
        figure.paste(picture_panel, (x, y + label))
        if i:  # the region grid over the heatmap
            top, bottom = y + label, y + label + panel - 1
            for k in range(1, cols):
                draw.line([(x + k * panel // cols, top), (x + k * panel // cols, bottom)], fill="white")
            for k in range(1, rows):
                draw.line([(x, top + k * panel // rows), (x + panel - 1, top + k * panel // rows)], fill="white")
    return figure


def _heat_colours(weights: np.ndarray) -> np.ndarray:
    """0..1 -> dark blue .. red .. yellow, (H, W) -> (H, W, 3) uint8."""
    r = np.clip(2.0 * weights, 0, 1)
    g = np.clip(2.0 * weights - 1.0, 0, 1)
    b = np.clip(1.0 - 2.0 * weights, 0, 1) * 0.6
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)
