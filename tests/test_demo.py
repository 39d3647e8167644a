"""The demo dataset's splits, and its scorer on scenes with known answers: right and wrong phrases,
cells and attention."""

import json
import tarfile

import pytest
import torch

from imcap.data.demo import all_scenes, build_demo, captions_for
from imcap.demo_scores import demo_scores, parse_phrases, region_cells

# a large red bar at the top left (cell 0) and a small blue pillar at the bottom right (cell 3)
SCENE = (("large", "red", "bar"), None, None, ("small", "blue", "pillar"))
REFERENCES = captions_for(SCENE)


def attention_on(cells_per_word: list[int], regions: int = 4) -> torch.Tensor:
    """(words, regions): each word's attention peaks on the first region of the given demo cell."""
    cell_of_region = region_cells(regions)
    alphas = torch.full((len(cells_per_word), regions), 0.1)
    for word, cell in enumerate(cells_per_word):
        alphas[word, (cell_of_region == cell).nonzero()[0]] = 1.0
    return alphas.softmax(dim=1)


def score(caption: str, cells_per_word: list[int], regions: int = 4) -> dict:
    words = caption.split()
    assert len(cells_per_word) == len(words)
    return demo_scores([words], [attention_on(cells_per_word, regions)], [REFERENCES])


def test_a_right_caption_looking_at_each_shape_scores_one_on_every_count():
    caption = "a large red bar at the top left and a small blue pillar at the bottom right"
    looks = [0] * 9 + [3] * 8  # "and" goes with the first phrase
    assert score(caption, looks) == {"phrase_accuracy": 1.0, "grounding": 1.0, "exact": 1.0}


def test_the_names_only_form_is_right_too_and_the_other_order_right_but_no_reference():
    names_only = "there is a large red bar and a small blue pillar"
    assert score(names_only, [0] * 7 + [3] * 4) == {"phrase_accuracy": 1.0, "grounding": 1.0, "exact": 1.0}
    reversed_order = "a small blue pillar at the bottom right and a large red bar at the top left"
    assert score(reversed_order, [3] * 9 + [0] * 8) == {"phrase_accuracy": 1.0, "grounding": 1.0, "exact": 0.0}


def test_a_shape_named_at_the_wrong_cell_is_a_wrong_phrase():
    caption = "a large red bar at the top right and a small blue pillar at the bottom right"
    scores = score(caption, [0] * 9 + [3] * 8)
    assert scores == {"phrase_accuracy": 0.5, "grounding": 1.0, "exact": 0.0}


def test_a_wrong_attribute_or_a_phrase_outside_the_grammar_is_wrong():
    assert score("a large green bar at the top left", [0] * 8)["phrase_accuracy"] == 0.0
    assert score("a large red bar at the", [0] * 6)["phrase_accuracy"] == 0.0
    assert score("red bar", [0] * 2)["phrase_accuracy"] == 0.0


def test_a_right_phrase_looking_at_another_cell_is_not_grounded():
    caption = "a large red bar at the top left and a small blue pillar at the bottom right"
    # the first phrase's size, colour and kind words (1-3) look at the empty top right cell
    looks = [0, 1, 1, 1, 0, 0, 0, 0, 0] + [3] * 8
    assert score(caption, looks) == {"phrase_accuracy": 1.0, "grounding": 0.5, "exact": 1.0}


def test_grounding_is_read_on_the_phrase_words_not_the_place_words():
    caption = "a large red bar at the top left"
    looks = [3, 0, 0, 0, 3, 3, 3, 3]  # only "large red bar" look at its cell
    assert score(caption, looks)["grounding"] == 1.0
    looks = [0, 3, 3, 3, 0, 0, 0, 0]
    assert score(caption, looks)["grounding"] == 0.0


def test_regions_of_a_finer_grid_map_to_their_cells():
    assert region_cells(16).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    caption = "a large red bar at the top left and a small blue pillar at the bottom right"
    assert score(caption, [0] * 9 + [3] * 8, regions=16)["grounding"] == 1.0


def test_counts_are_over_all_images_and_phrases():
    right = "a large red bar at the top left and a small blue pillar at the bottom right".split()
    wrong = "a small red bar at the top left".split()
    scores = demo_scores(
        [right, wrong], [attention_on([0] * 9 + [3] * 8), attention_on([0] * 7)], [REFERENCES, REFERENCES]
    )
    assert scores == {"phrase_accuracy": pytest.approx(2 / 3), "grounding": 1.0, "exact": 0.5}


def test_a_set_that_is_not_the_demo_gets_no_demo_scores():
    words = "a dog runs on the grass".split()
    assert demo_scores([words], [torch.full((6, 4), 0.25)], [["a dog runs on the grass"]]) is None


def test_phrases_know_where_they_start():
    phrases = parse_phrases("there is a large red bar and a small blue pillar".split())
    assert [(p.shape, p.cell, p.start) for p in phrases] == [
        (("large", "red", "bar"), None, 2),
        (("small", "blue", "pillar"), None, 7),
    ]


def test_demo_val_scenes_are_distinct_and_never_in_train_which_draws_every_other_scene_before_repeating(tmp_path):
    out = build_demo(tmp_path, train_images=8000, val_images=500, image_size=32, shard_samples=4000)

    def scenes(split: str) -> list[str]:  # a scene's first caption names its every shape and cell
        found = []
        for shard in sorted(out.glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                found += [json.loads(tar.extractfile(m).read())["captions"][0] for m in tar if m.name.endswith(".json")]
        return found

    train, val = scenes("train"), scenes("val")
    assert len(val) == len(set(val)) == 500 and not set(val) & set(train)
    assert len(train) == 8000 and len(set(train)) == len(all_scenes()) - 500 == 7420  # all the others, then again
