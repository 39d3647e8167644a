"""CIDEr-D on token ids, vectorised: the reward of self-critical training.

The score is coco-caption's CIDEr-D (pycocoevalcap's `Cider`: tf-idf n-gram vectors for n = 1..4,
clipped cosine similarity, a Gaussian penalty on the difference in length, times 10, averaged over the
references), computed with numpy over all the captions of a batch at once. The document frequencies
are fixed: counted once over the train split's references, as self-critical.pytorch does, so a caption's
reward does not depend on the batch it is in.

Captions are token ids of the vocabulary. References are tokenised as the vocabulary was and each one
ends in `<end>`, as does every caption that ended: ending well ("... the table <end>") is an n-gram the
references hold, ending in a function word ("... on a <end>") is not. A reference word outside the
vocabulary gets an id of its own past the vocabulary's, so it counts as a word no caption can match,
as the metric counts it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imcap.errors import ImcapError, reason
from imcap.text import Vocabulary, tokenize

log = logging.getLogger(__name__)
NGRAMS, SIGMA = 4, 6.0  # CIDEr-D's n-gram sizes and the width of its length penalty
ID_BITS = 15  # an n-gram's code packs its ids + 1 in 15 bits each: 4 of them fit an int64
MAX_IDS = (1 << ID_BITS) - 1  # ids 0 .. MAX_IDS - 1; reference words past that share the last id
FREQUENCIES_FILE = "cider_document_frequencies.npz"  # in the run directory and in every checkpoint


class RewardError(ImcapError, ValueError):
    pass


@dataclass(frozen=True)
class DocumentFrequencies:
    """In how many images' references each n-gram occurs, over a fixed corpus (the train split)."""

    codes: np.ndarray  # (G,) int64 n-gram codes, sorted
    counts: np.ndarray  # (G,) images whose references hold each n-gram
    images: int  # images in the corpus
    extra_words: tuple[str, ...]  # reference words outside the vocabulary: ids len(vocab), len(vocab) + 1, ...
    vocabulary_size: int

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name without it
            np.savez(
                f,
                codes=self.codes,
                counts=self.counts,
                images=np.int64(self.images),
                extra_words=np.array(self.extra_words, dtype=str),
                vocabulary_size=np.int64(self.vocabulary_size),
            )

    @classmethod
    def load(cls, path: str | Path) -> DocumentFrequencies:
        try:
            with np.load(path, allow_pickle=False) as saved:
                return cls(
                    saved["codes"],
                    saved["counts"],
                    int(saved["images"]),
                    tuple(saved["extra_words"].tolist()),
                    int(saved["vocabulary_size"]),
                )
        except (OSError, ValueError, KeyError) as e:
            raise RewardError(f"{path} is not readable document frequencies of CIDEr-D: {reason(e)}") from None

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """The document frequency of each n-gram code; 0 for one the corpus never holds."""
        if not len(self.codes):
            return np.zeros(len(codes), dtype=np.int64)
        at = np.searchsorted(self.codes, codes).clip(max=len(self.codes) - 1)
        return np.where(self.codes[at] == codes, self.counts[at], 0)


class ReferenceWords:
    """Reference caption text -> token ids: the vocabulary's ids, then ids of the words it lacks, then <end>."""

    def __init__(self, vocab: Vocabulary, extra_words: tuple[str, ...] = ()):
        self.vocab = vocab
        self.index = dict(vocab.index)
        self.index.update((w, min(len(vocab) + i, MAX_IDS - 1)) for i, w in enumerate(extra_words))

    @property
    def extra_words(self) -> tuple[str, ...]:
        return tuple(self.index)[len(self.vocab) :]

    def encode(self, caption: str) -> np.ndarray:
        """-> (words + 1,) ids ending in <end>; a word never seen has the last id, which all such words share."""
        ids = [self.index.get(w, MAX_IDS - 1) for w in tokenize(caption)]
        ids.append(self.vocab.end)
        return np.array(ids, dtype=np.int64)

    def grow(self, caption: str) -> np.ndarray:
        """encode, a word never seen first given an id of its own (those past MAX_IDS share the last one)."""
        for word in tokenize(caption):
            if word not in self.index:
                if len(self.index) == MAX_IDS - 1:
                    log.warning("CIDEr-D reward: reference words past the %dth share an id", MAX_IDS - 1)
                self.index[word] = min(len(self.index), MAX_IDS - 1)
        return self.encode(caption)


def check_vocabulary(vocab: Vocabulary) -> None:
    if len(vocab) >= MAX_IDS:
        raise RewardError(f"the CIDEr-D reward takes vocabularies of under {MAX_IDS} words; this one has {len(vocab)}")


def document_frequencies(references: list[list[str]], vocab: Vocabulary) -> DocumentFrequencies:
    """Count, for every n-gram, the images among `references` (each image's reference captions) that hold it."""
    check_vocabulary(vocab)
    words = ReferenceWords(vocab)
    encoded = [[words.grow(caption) for caption in captions] for captions in references]
    sequence, code = ngrams([ids for captions in encoded for ids in captions])
    image_of = np.repeat(np.arange(len(encoded)), [len(captions) for captions in encoded])
    codes, dense = np.unique(code, return_inverse=True)
    image_and_ngram = np.unique(image_of[sequence] * len(codes) + dense)  # each (image, n-gram) once
    counts = np.bincount(image_and_ngram % len(codes), minlength=len(codes))
    return DocumentFrequencies(codes, counts, len(references), words.extra_words, len(vocab))


def ngrams(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every n-gram (n = 1..4) of the token sequences, one per position: (which sequence, its int64 code: the
    ids + 1, ID_BITS bits each, so that no two n-grams of any sizes share one)."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    flat = np.concatenate([*sequences, np.zeros(NGRAMS, dtype=np.int64)]) + 1  # padded: windows stay inside
    sequence_of = np.repeat(np.arange(len(sequences)), lengths)  # (total,)
    left = np.cumsum(lengths)[sequence_of] - np.arange(len(sequence_of))  # tokens from each position on
    sequences_, codes, code = [], [], np.zeros(len(sequence_of), dtype=np.int64)
    for n in range(NGRAMS):
        code = code | (flat[n : n + len(sequence_of)] << (ID_BITS * n))  # the (n+1)-gram starting at each position
        starts = left > n
        sequences_.append(sequence_of[starts])
        codes.append(code[starts])
    return np.concatenate(sequences_), np.concatenate(codes)


def ngram_order(codes: np.ndarray) -> np.ndarray:
    """n - 1 of each n-gram code (0 for unigrams)."""
    return sum((codes >> (ID_BITS * n) != 0).astype(np.int64) for n in range(1, NGRAMS))


@dataclass(frozen=True)
class NgramCounts:
    """How often each distinct n-gram occurs in each sequence: one entry per sequence and n-gram."""

    sequence: np.ndarray  # (E,) which sequence
    ngram: np.ndarray  # (E,) which n-gram: an index into the codes it was counted against
    count: np.ndarray  # (E,)

    @classmethod
    def of(cls, sequence: np.ndarray, ngram: np.ndarray, ngrams: int) -> NgramCounts:
        keys, count = np.unique(sequence * ngrams + ngram, return_counts=True)
        return cls(keys // ngrams, keys % ngrams, count)


class CiderD:
    """CIDEr-D of captions against each image's references, with fixed document frequencies."""

    def __init__(self, frequencies: DocumentFrequencies, vocab: Vocabulary):
        check_vocabulary(vocab)
        if frequencies.vocabulary_size != len(vocab):
            raise RewardError(
                f"CIDEr-D document frequencies were counted for a vocabulary of {frequencies.vocabulary_size} words, "
                f"this one has {len(vocab)}"
            )
        self.frequencies = frequencies
        self.words = ReferenceWords(vocab, frequencies.extra_words)
        self.log_images = np.log(float(frequencies.images))

    def encode_references(self, references: list[list[str]]) -> list[list[np.ndarray]]:
        return [[self.words.encode(caption) for caption in captions] for captions in references]

    def __call__(self, captions: list[np.ndarray], image_of: np.ndarray, references: list[list[np.ndarray]]):
        """captions: token ids each (its <end> included if it ended), of image image_of[i]; references: each
        image's reference ids (encode_references). -> (captions,) float64 CIDEr-D."""
        refs_per_image = np.array([len(r) for r in references])
        ref_sequences = [ids for refs in references for ids in refs]
        ref_image = np.repeat(np.arange(len(references)), refs_per_image)  # (M,)
        ref_slot = _positions_in_runs(refs_per_image)  # (M,) each reference's place among its image's
        hyp_sequence, hyp_code = ngrams(list(captions))
        ref_sequence, ref_code = ngrams(ref_sequences)
        # the batch's distinct n-grams, G of them: their idf and n, looked up once
        codes, dense = np.unique(np.concatenate([hyp_code, ref_code]), return_inverse=True)
        idf = self.log_images - np.log(np.maximum(1.0, self.frequencies.lookup(codes)))  # (G,)
        order = ngram_order(codes)  # (G,)
        hyp = NgramCounts.of(hyp_sequence, dense[: len(hyp_code)], len(codes))
        ref = NgramCounts.of(ref_sequence, dense[len(hyp_code) :], len(codes))
        hyp_weight, hyp_norm = _tfidf(hyp, idf, order, len(captions))
        ref_weight, ref_norm = _tfidf(ref, idf, order, len(ref_sequences))
        # join: every caption n-gram with the same n-gram in each reference of its image
        hyp_key = image_of[hyp.sequence] * len(codes) + hyp.ngram
        ref_key = ref_image[ref.sequence] * len(codes) + ref.ngram
        by_key = np.argsort(ref_key, kind="stable")
        lo, hi = (np.searchsorted(ref_key[by_key], hyp_key, side=side) for side in ("left", "right"))
        hyp_entry = np.repeat(np.arange(len(hyp_key)), hi - lo)
        ref_entry = by_key[np.repeat(lo, hi - lo) + _positions_in_runs(hi - lo)]
        clipped = np.minimum(hyp_weight[hyp_entry], ref_weight[ref_entry]) * ref_weight[ref_entry]
        slots = max(int(refs_per_image.max(initial=0)), 1)
        slot = ref_slot[ref.sequence[ref_entry]]
        cell = (hyp.sequence[hyp_entry] * slots + slot) * NGRAMS + order[hyp.ngram[hyp_entry]]
        dots = _summed(cell, clipped, len(captions) * slots * NGRAMS).reshape(len(captions), slots, NGRAMS)
        # each caption against each of its image's reference slots (N, slots, n)
        first_ref = np.cumsum(refs_per_image) - refs_per_image  # (images,)
        real = np.arange(slots) < refs_per_image[image_of][:, None]  # (N, slots)
        ref_at = np.where(real, first_ref[image_of][:, None] + np.arange(slots), 0)  # (N, slots) the reference's row
        norms = hyp_norm[:, None, :] * ref_norm[ref_at]  # (N, slots, n)
        cosine = np.divide(dots, norms, out=dots.copy(), where=norms != 0)
        hyp_length = np.maximum(np.array([len(c) for c in captions]) - 1, 0)  # CIDEr-D counts a caption's bigrams
        ref_length = np.maximum(np.array([len(r) for r in ref_sequences]) - 1, 0)
        delta = hyp_length[:, None] - ref_length[ref_at]  # (N, slots)
        penalty = np.exp(-(delta.astype(np.float64) ** 2) / (2 * SIGMA**2))
        per_slot = cosine.mean(axis=2) * penalty * real
        return 10.0 * per_slot.sum(axis=1) / refs_per_image[image_of]


def _tfidf(grams: NgramCounts, idf: np.ndarray, order: np.ndarray, sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """-> each entry's tf-idf weight (E,) and each sequence's vector norm per n (sequences, n)."""
    weight = grams.count * idf[grams.ngram]
    squares = _summed(grams.sequence * NGRAMS + order[grams.ngram], weight**2, sequences * NGRAMS)
    return weight, np.sqrt(squares).reshape(sequences, NGRAMS)


def _positions_in_runs(lengths: np.ndarray) -> np.ndarray:
    """[2, 3] -> [0, 1, 0, 1, 2]: each item's place in its run, for runs of these lengths."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _summed(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """(size,) float64: the values summed at each index (np.bincount, which answers int64 for no values)."""
    return np.bincount(index, values, minlength=size).astype(np.float64, copy=False)
