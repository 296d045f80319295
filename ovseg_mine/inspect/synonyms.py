"""Caption nouns to COCO categories, through the shipped table ``ovseg_mine/data/coco_synonyms.json``.

The table maps lemmatized lower-case nouns (the ``noun`` column of a pairs shard) to COCO category names
(``man``, ``woman``, ``people``, ``player`` -> ``person``; ``puppy`` -> ``dog``; ``bike`` -> ``bicycle``; ...).
A noun equal to a category name of the ground truth maps to that category without a table entry. Anything
else is *unmapped*: ``inspect --gt`` counts such pairs instead of scoring them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Iterable

from ovseg_mine.resources import data_dir

SYNONYMS_PATH = data_dir() / "coco_synonyms.json"


@lru_cache(maxsize=1)
def load_synonyms() -> dict[str, str]:
    """The shipped table as ``{noun: COCO category name}`` (keys and values lower-case)."""
    data = json.loads(SYNONYMS_PATH.read_text(encoding="utf-8"))
    return {k.strip().lower(): v.strip().lower() for k, v in data["synonyms"].items()}


class NounMapper:
    """Maps nouns to the category ids of one ground-truth file.

    Args:
        categories: ``{category id: category name}`` of the ground truth (COCO ``categories``).
        synonyms: ``{noun: category name}``; default the shipped table (:func:`load_synonyms`).
    """

    def __init__(self, categories: dict[int, str], synonyms: dict[str, str] | None = None) -> None:
        self.categories = dict(categories)
        by_name = {name.strip().lower(): cid for cid, name in categories.items()}
        table = load_synonyms() if synonyms is None else synonyms
        self._map = dict(by_name)
        for noun, name in table.items():
            if name in by_name and noun not in self._map:
                self._map[noun] = by_name[name]

    def category(self, noun: str) -> int | None:
        """The category id ``noun`` maps to, or None when it maps to none (unmapped)."""
        key = noun.strip().lower()
        if key in self._map:
            return self._map[key]
        if key.endswith("s") and key[:-1] in self._map:  # a plural the lemmatizer left ("skis" is a name itself)
            return self._map[key[:-1]]
        return None

    def unmapped(self, nouns: Iterable[str]) -> list[str]:
        """The nouns of ``nouns`` that map to no category, in input order."""
        return [n for n in nouns if self.category(n) is None]
