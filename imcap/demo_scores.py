"""Scores that say whether a demo captioner is right about the picture, which BLEU on a template cannot.

The demo's captions follow a grammar (imcap.data.demo): shape phrases "a SIZE COLOUR KIND at the PLACE"
joined by "and", or "there is" and the phrases without places. The scene is read back from an image's
references, so the scores need nothing but what an evaluation already has:

- phrase_accuracy: generated phrases that name a shape of the scene at its cell (a phrase without a
  place: a shape of the scene anywhere); a phrase outside the grammar counts as wrong.
- grounding: of the right phrases, the share whose attention, summed over the phrase's size, colour and
  kind words, peaks on a region inside that shape's cell.
- exact: captions equal to one of the image's references.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from imcap.data.demo import COLOURS, KINDS, PLACES, SIZES
from imcap.model.encoder import grid_shape
from imcap.text import tokenize

CELLS = 2  # the demo's scenes are a CELLS x CELLS grid of cells, PLACES in reading order
PLACE_WORDS = {tuple(place.split()): cell for cell, place in enumerate(PLACES)}
Shape = tuple[str, str, str]  # (size, colour, kind)


class Phrase(NamedTuple):
    shape: Shape | None  # None: the phrase is outside the grammar
    cell: int | None  # None: no place named
    start: int  # index of the phrase's first word in the caption


def parse_phrases(words: list[str]) -> list[Phrase]:
    """A caption's words -> its shape phrases, each with where it starts."""
    start = 2 if words[:2] == ["there", "is"] else 0
    phrases, begin = [], start
    for end in [i for i, w in enumerate(words) if w == "and" and i >= start] + [len(words)]:
        phrases.append(_phrase(words[begin:end], begin))
        begin = end + 1
    return phrases


def _phrase(words: list[str], start: int) -> Phrase:
    if len(words) < 4 or words[0] != "a" or words[1] not in SIZES or words[2] not in COLOURS or words[3] not in KINDS:
        return Phrase(None, None, start)
    shape = (words[1], words[2], words[3])
    if len(words) == 4:
        return Phrase(shape, None, start)
    cell = PLACE_WORDS.get(tuple(words[4:]))
    return Phrase(shape if cell is not None else None, cell, start)


def scene_from_references(references: list[str]) -> dict[int, Shape] | None:
    """{cell: shape} from the references that name places; None if a reference is outside the grammar
    (the set is not the demo's)."""
    scene: dict[int, Shape] = {}
    for reference in references:
        phrases = parse_phrases(tokenize(reference))
        if any(p.shape is None for p in phrases):
            return None
        scene.update({p.cell: p.shape for p in phrases if p.cell is not None})
    return scene or None


def region_cells(regions: int) -> torch.Tensor:
    """(R,) the demo cell of each region of the encoder's grid, regions in reading order."""
    side, _ = grid_shape(regions)
    if side % CELLS:
        raise ValueError(f"a grid of {side} x {side} regions does not divide into {CELLS} x {CELLS} cells")
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    return (rows * CELLS // side) * CELLS + cols * CELLS // side


def demo_scores(captions: list[list[str]], alphas: list[torch.Tensor], references: list[list[str]]) -> dict | None:
    """captions: generated words per image; alphas: (words, R) attention per image; references: the
    image's reference captions. -> {phrase_accuracy, grounding, exact}, or None if not a demo set."""
    scenes = [scene_from_references(refs) for refs in references]
    if not captions or any(scene is None for scene in scenes):
        return None
    phrases = right = grounded = exact = 0
    for words, alpha, refs, scene in zip(captions, alphas, references, scenes):
        exact += words in [tokenize(r) for r in refs]
        cell_of_region = region_cells(alpha.shape[1])
        for phrase in parse_phrases(words):
            phrases += 1
            cells = [c for c, shape in scene.items() if shape == phrase.shape and phrase.cell in (None, c)]
            if not cells:
                continue
            right += 1
            looked = alpha[phrase.start + 1 : phrase.start + 4].float().sum(dim=0)  # its size, colour, kind words
            grounded += cell_of_region[looked.argmax()].item() in cells
    return {
        "phrase_accuracy": right / max(phrases, 1),
        "grounding": grounded / max(right, 1),
        "exact": exact / len(captions),
    }
