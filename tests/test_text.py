import pytest

from imcap.text import Vocabulary, pad_captions, tokenize


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize("A Dog's ball, RED!  (two)") == ["a", "dog's", "ball", "red", "two"]


def test_vocabulary_keeps_words_seen_at_least_min_count_times_and_specials_first():
    vocab = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_word_count=2)
    assert vocab.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    assert vocab.pad == 0


def test_encode_decode_round_trip_and_unknown_words(tmp_path):
    vocab = Vocabulary.build(["a red circle on the left", "a blue square"], min_word_count=1)
    ids = vocab.encode("A red square, on the left.", max_length=20)
    assert ids[0] == vocab.start and ids[-1] == vocab.end
    assert vocab.decode(ids) == "a red square on the left"
    assert vocab.decode(vocab.encode("a green circle", 20)) == "a <unk> circle"
    assert vocab.encode("a red circle on the left", max_length=3)[1:-1] == [
        vocab.index[w] for w in "a red circle".split()
    ]
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab


def test_decode_stops_at_end_and_skips_padding():
    vocab = Vocabulary.build(["a b c"], 1)
    a, b = vocab.index["a"], vocab.index["b"]
    assert vocab.decode([vocab.start, a, vocab.pad, b, vocab.end, a]) == "a b"


def test_pad_captions_pads_with_pad_id():
    padded = pad_captions([[1, 5, 2], [1, 2]], pad=0)
    assert padded.tolist() == [[1, 5, 2], [1, 2, 0]]


def test_loading_a_file_that_is_not_a_vocabulary_names_it(tmp_path):
    bad = tmp_path / "vocab.json"
    bad.write_text('{"tokens": []}')
    with pytest.raises(ValueError, match="vocab.json is not an imcap vocabulary"):
        Vocabulary.load(bad)


def test_tokenize_keeps_accented_and_cjk_words_whole_and_reads_a_curly_apostrophe_as_one():
    assert tokenize("Café crème, the dog’s bowl; 猫が座る") == ["café", "crème", "the", "dog's", "bowl", "猫が座る"]
