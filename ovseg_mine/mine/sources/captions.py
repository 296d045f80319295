"""Caption screening: what reaches the noun parser, and what is skipped or cut, with a reason.

The noun stage parses captions with an *English* spaCy pipeline. Fed other text, it does not fail: it
invents nouns ("un chat noir dort sur le canapé" comes out as one long compound noun), which would become
junk pairs. So every caption is screened first, and every skip or cut is listed with the image:

* no letters at all (empty, emoji-only, punctuation): skipped;
* mostly non-Latin script (Chinese, Cyrillic, Arabic...): skipped as not English;
* four or more words, none of them an English function word (spaCy's English stop-word list: "a", "the",
  "on", "with"...): skipped as not English. COCO captions virtually always contain one; a French or Spanish
  sentence does not ("un chat noir dort sur le canapé");
* longer than ``max_chars`` characters: cut at the last word boundary before it (COCO's longest caption is a
  few hundred characters; a 10,000-character caption is a data error and would flood the image with nouns).

This is a heuristic, not language identification: a short non-English caption ("chat noir") passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_LATIN_MAX = 0x024F  # end of Unicode's Latin Extended-B block
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


@lru_cache(maxsize=1)
def _function_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS  # a word list only: no model is loaded

    return frozenset(STOP_WORDS)


@dataclass(frozen=True)
class Screened:
    """The outcome of :func:`screen_caption`.

    Attributes:
        text: the caption to keep (stripped, as written otherwise; cut when over-long), or None when skipped.
        note: why it was skipped or cut (a sentence without the caption's index), or None when kept as is.
    """

    text: str | None
    note: str | None


def screen_caption(caption: str, *, max_chars: int = 1000, english_only: bool = True) -> Screened:
    """Decide whether, and what part of, one caption goes to the English noun parser.

    Args:
        caption: the caption as written in the dataset.
        max_chars: longer captions are cut at the last space at or before this many characters.
        english_only: skip captions that look non-English (see the module docstring); False keeps them.

    Returns:
        A :class:`Screened` with the text to parse (or None) and the note to list (or None).

    Raises:
        TypeError: ``caption`` is not a string.
    """
    if not isinstance(caption, str):
        raise TypeError(f"captions must be strings, got {type(caption).__name__}")
    text = caption.strip()
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return Screened(None, "no letters (empty, emoji or punctuation only)" if text else "empty caption")
    note = None
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[: cut if cut > 0 else max_chars].rstrip()
        note = f"{len(caption.strip())} characters long, cut to {len(text)}"
    if english_only:
        latin = sum(1 for c in letters if ord(c) <= _LATIN_MAX)
        if latin < len(letters) / 2:
            return Screened(None, "not English (mostly non-Latin script)")
        words = _WORD.findall(text.lower())
        if len(words) >= 4 and not any(w in _function_words() for w in words):
            return Screened(None, f"not English (no English function word in {len(words)} words)")
    return Screened(text, note)
