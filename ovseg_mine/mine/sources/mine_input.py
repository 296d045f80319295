"""What a run mines, as one validated value: :class:`MineInput` (the source's kind and location, COCO's image root,
where the masks come from), and the registry of source kinds it is checked against.

A :class:`MineInput` is checked once, where it is built (:meth:`MineInput.from_options` from the command line's
``--source``/``--captions``/``--images``/``--proposals``, or the constructor from a library caller): every bad
combination is a one-line :class:`~ovseg_mine.mine.sources.base.SourceError`. What reads it (the driver,
:func:`build_source`, :meth:`MineInput.proposal_source`) does not check it again. The config records the two kinds
(``source.kind``, ``proposals.kind``): :meth:`MineInput.configure` fills them in from the input; the locations are
not part of the config (the manifest records them), so the same config mines any copy of a dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ovseg_mine.mine.sources.base import Screening, Source, SourceError
from ovseg_mine.mine.sources.coco import CocoSource
from ovseg_mine.mine.sources.folder import FolderSource
from ovseg_mine.mine.sources.hf import HfSource
from ovseg_mine.mine.sources.img2dataset import Img2DatasetSource
from ovseg_mine.mine.sources.proposal_files import (
    ProposalSource,
    build_proposal_source,
    list_proposal_sources,
    parse_proposals,
)
from ovseg_mine.mine.sources.webdataset import WebDatasetSource

if TYPE_CHECKING:
    from ovseg_mine.config import MineConfig

_SOURCES: dict[str, type[Source]] = {
    cls.kind: cls for cls in (CocoSource, HfSource, WebDatasetSource, Img2DatasetSource, FolderSource)
}


def list_sources() -> list[str]:
    """The source kinds ``--source KIND:LOCATION`` accepts: ``coco``, ``folder``, ``hf``, ``img2dataset``,
    ``webdataset``."""
    return sorted(_SOURCES)


def parse_source(spec: str) -> tuple[str, str]:
    """Split ``KIND:LOCATION`` (``webdataset:shards/{00000..00009}.tar``, ``hf:user/name``) into its two parts.

    Raises:
        SourceError: no ``KIND:`` prefix, an unknown kind (the message lists the valid ones), or no location.
    """
    kind, sep, location = spec.partition(":")
    if not sep or kind not in _SOURCES:
        raise SourceError(f"--source must be KIND:LOCATION with KIND one of {', '.join(list_sources())}; got {spec!r}")
    if not location:
        raise SourceError(f"--source {spec!r} names no location after {kind}:")
    return kind, location


@dataclass(frozen=True)
class MineInput:
    """What a run mines: a source and where its masks come from. Checked when built; immutable.

    Attributes:
        kind: the source kind, one of :func:`list_sources`.
        location: the source's location (COCO: the captions JSON; see :mod:`ovseg_mine.mine.sources`), a path or
            a URI (``s3://``, ``gs://``, ``file://``); a path-like is kept as its string.
        image_root: COCO's image folder (``--images``), the JSON's ``file_name`` entries are relative to it; None
            for the other kinds, which find their images themselves.
        proposals_kind: ``sam`` (SAM's automatic mask generator) or a given-mask kind of
            :func:`~ovseg_mine.mine.sources.proposal_files.list_proposal_sources` (``coco``, ``sa1b``).
        proposals_location: where the given masks are (``--proposals KIND:LOCATION``); None with ``sam``.

    Raises:
        SourceError: an unknown source or proposals kind (the message lists the valid ones), no location, a COCO
            source without ``image_root`` or another kind with one, given masks without their location, or a
            masks location with ``sam``.
    """

    kind: str
    location: str
    image_root: str | None = None
    proposals_kind: str = "sam"
    proposals_location: str | None = None

    def __post_init__(self) -> None:
        for name in ("location", "image_root", "proposals_location"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, os.fspath(value))
        if self.kind not in _SOURCES:
            raise SourceError(f"unknown source kind {self.kind!r}; valid: {', '.join(list_sources())}")
        if not self.location:
            raise SourceError(f"a {self.kind} source needs its location: --source {self.kind}:LOCATION")
        if self.kind == "coco" and self.image_root is None:
            raise SourceError("a COCO source needs its image folder: --images DIR")
        if self.kind != "coco" and self.image_root is not None:
            raise SourceError(f"--images is for COCO sources only; a {self.kind} source finds its images itself")
        if self.proposals_kind != "sam" and self.proposals_kind not in list_proposal_sources():
            raise SourceError(
                f"unknown proposals kind {self.proposals_kind!r}; valid: sam, {', '.join(list_proposal_sources())}"
            )
        if self.proposals_kind != "sam" and not self.proposals_location:
            raise SourceError(f"proposals.kind is {self.proposals_kind!r}: give their location, --proposals KIND:PATH")
        if self.proposals_kind == "sam" and self.proposals_location:
            raise SourceError("a proposals location was given but proposals.kind is 'sam'")

    @classmethod
    def from_options(
        cls,
        *,
        source: str | None = None,
        captions: str | None = None,
        images: str | None = None,
        proposals: str | None = None,
    ) -> "MineInput":
        """The input the command line names: ``--source KIND:LOCATION``, or ``--captions F --images DIR`` (COCO),
        and ``--proposals sam|KIND:LOCATION`` (None: SAM).

        Raises:
            SourceError: both or neither of ``source`` and ``captions``, a malformed ``source`` or ``proposals``
                (:func:`parse_source`, :func:`~ovseg_mine.mine.sources.proposal_files.parse_proposals`), or a
                combination the constructor refuses.
        """
        if source is not None and captions is not None:
            raise SourceError("give either --source KIND:LOCATION or --captions F --images DIR, not both")
        if source is None and captions is None:
            raise SourceError("nothing to mine: give --source KIND:LOCATION, or --captions F --images DIR (COCO)")
        kind, location = parse_source(source) if source is not None else ("coco", str(captions))
        given_kind, given = parse_proposals(proposals) if proposals is not None else ("sam", "")
        return cls(kind, location, images, given_kind, given or None)

    def configure(self, cfg: "MineConfig") -> "MineConfig":
        """``cfg`` with the kinds this input names: ``source.kind`` and ``proposals.kind`` (what the run folder's
        config, its hash and the shards record); every other value as it is."""
        data = cfg.model_dump()
        data["source"]["kind"] = self.kind
        data["proposals"]["kind"] = self.proposals_kind
        return type(cfg).model_validate(data)

    def proposal_source(self) -> ProposalSource | None:
        """The given-mask source (:func:`~ovseg_mine.mine.sources.proposal_files.build_proposal_source`); None
        when SAM generates the masks."""
        if self.proposals_kind == "sam":
            return None
        return build_proposal_source(self.proposals_kind, str(self.proposals_location))


def build_source(cfg: "MineConfig", what: MineInput) -> Source:
    """The :class:`~ovseg_mine.mine.sources.base.Source` of kind ``what.kind`` reading ``what.location`` (COCO:
    with ``what.image_root``), with the columns, selection and caption screening of ``cfg.source`` and
    ``cfg.nouns``. Nothing is read yet: :meth:`~ovseg_mine.mine.sources.base.Source.plan` lists the input."""
    screening = Screening.of(cfg.source, cfg.nouns)
    if what.kind == "coco":
        return CocoSource(what.location, cfg.source, screening, image_root=what.image_root)
    return _SOURCES[what.kind](what.location, cfg.source, screening)
