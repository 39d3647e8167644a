"""Word-level tokenisation and the vocabulary: build (from the train split only), save, load, encode, decode."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from imcap.errors import ImcapError, reason

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
VOCAB_FILE = "vocab.json"  # beside the shards, in every checkpoint


class VocabularyError(ImcapError, ValueError):
    """A vocab.json (beside the shards, in a checkpoint or an export) that is missing or not a vocabulary."""


_WORD = re.compile(r"[^\W_]+(?:'[^\W\d_]+)?")  # letters and digits of any script; after ' letters only


def tokenize(caption: str) -> list[str]:
    """Lowercase, punctuation stripped: "A dog's ball, red." -> ["a", "dog's", "ball", "red"]; "café" and
    "猫" are words too, and a curly apostrophe (dog’s) is the straight one."""
    return _WORD.findall(caption.lower().replace("\u2019", "'"))


class Vocabulary:
    def __init__(self, words: list[str], min_word_count: int):
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {words[:4]}")
        self.words = list(words)
        self.min_word_count = min_word_count
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad, self.start, self.end, self.unk = (self.index[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    @classmethod
    def build(cls, captions: Iterable[str], min_word_count: int) -> Vocabulary:
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted(w for w, n in counts.items() if n >= min_word_count)  # sorted: same input, same ids
        return cls([*SPECIALS, *kept], min_word_count)

    def encode(self, caption: str, max_length: int) -> list[int]:
        """<start> w1 .. wn <end>, with at most max_length words."""
        ids = [self.index.get(w, self.unk) for w in tokenize(caption)[:max_length]]
        return [self.start, *ids, self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> caption text, stopping at <end> and leaving out <start> and <pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i not in (self.start, self.pad):
                words.append(self.words[i])
        return " ".join(words)

    def to_json(self) -> str:
        return json.dumps({"min_word_count": self.min_word_count, "words": self.words})

    @classmethod
    def from_json(cls, text: str, source: str = "vocabulary") -> Vocabulary:
        try:
            data = json.loads(text)
            return cls(data["words"], data["min_word_count"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VocabularyError(
                f"{source} is not an imcap vocabulary (expected JSON with 'words' and 'min_word_count'): {e}"
            ) from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise VocabularyError(f"vocabulary {path} cannot be read: {reason(e)}") from None
        return cls.from_json(text, source=str(path))


def pad_captions(encoded: list[list[int]], pad: int) -> torch.Tensor:
    """Token id lists -> (N, T) LongTensor padded to the longest."""
    longest = max(len(ids) for ids in encoded)
    out = torch.full((len(encoded), longest), pad, dtype=torch.long)  # (N, T)
    for row, ids in enumerate(encoded):
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
