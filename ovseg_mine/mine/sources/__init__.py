"""Sources: where a run's images and captions come from, one module per kind behind a registry.

==============  ===========================================================  ======================================
kind            LOCATION                                                     module
==============  ===========================================================  ======================================
``coco``        a COCO Captions JSON (``--captions F --images DIR``)         :mod:`~ovseg_mine.mine.sources.coco`
``hf``          a ``save_to_disk`` folder, Parquet/Arrow files, a Hub name   :mod:`~ovseg_mine.mine.sources.hf`
``webdataset``  a tar, a folder of tars, a brace or glob pattern             :mod:`~ovseg_mine.mine.sources.webdataset`
``img2dataset`` an img2dataset output folder (webdataset, parquet, files)    :mod:`~ovseg_mine.mine.sources.img2dataset`
``folder``      a folder of images with ``captions.jsonl`` or ``.csv``       :mod:`~ovseg_mine.mine.sources.folder`
==============  ===========================================================  ======================================

Every kind plans light shard tasks in the driver and produces its records inside Ray
(:mod:`~ovseg_mine.mine.sources.base`, :mod:`~ovseg_mine.mine.sources.records`, :mod:`~ovseg_mine.mine.sources.read`;
:mod:`~ovseg_mine.mine.sources.tables` reads Parquet and Arrow files for ``hf`` and ``img2dataset``;
:mod:`~ovseg_mine.mine.sources.captions` screens captions: empty, non-English, over-long).

Masks the user already has (``--proposals KIND:LOCATION``) are read here too:
:mod:`~ovseg_mine.mine.sources.proposal_files` (COCO instances or panoptic, SA-1B JSON: an index, attached to the
records by the read step); :mod:`~ovseg_mine.mine.algorithms.given_proposals` turns a record's masks into the
proposals the engine matches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ovseg_mine.mine.sources.base import Reject, Screening, ShardTask, Source, SourceError, SourcePlan
from ovseg_mine.mine.sources.coco import CocoCaptions, CocoSource, ImageRecord, read_coco_captions
from ovseg_mine.mine.sources.folder import FolderSource
from ovseg_mine.mine.sources.hf import HfSource
from ovseg_mine.mine.sources.img2dataset import Img2DatasetSource
from ovseg_mine.mine.sources.webdataset import WebDatasetSource

if TYPE_CHECKING:
    from ovseg_mine.config import MineConfig

__all__ = [
    "CocoCaptions",
    "ImageRecord",
    "Reject",
    "ShardTask",
    "Source",
    "SourceError",
    "SourcePlan",
    "build_source",
    "list_sources",
    "parse_source",
    "read_coco_captions",
]

_SOURCES: dict[str, type[Source]] = {
    cls.kind: cls for cls in (CocoSource, HfSource, WebDatasetSource, Img2DatasetSource, FolderSource)
}


def list_sources() -> list[str]:
    """The source kinds ``--source KIND:LOCATION`` accepts: ``coco``, ``folder``, ``hf``, ``img2dataset``,
    ``webdataset``."""
    return sorted(_SOURCES)


def describe_sources() -> dict[str, str]:
    """Each kind with one line saying what its LOCATION is."""
    return {kind: _SOURCES[kind].summary for kind in list_sources()}


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


def build_source(cfg: "MineConfig", location: str, *, image_root: str | None = None) -> Source:
    """The :class:`Source` of kind ``cfg.source.kind`` reading ``location`` (``image_root``: COCO's ``--images``).

    Raises:
        SourceError: an unknown kind (the message lists the valid ones), or a COCO source without image root.
    """
    kind = cfg.source.kind
    if kind not in _SOURCES:
        raise SourceError(f"unknown source kind {kind!r}; valid: {', '.join(list_sources())}")
    screening = Screening.of(cfg.source, cfg.nouns)
    if kind == "coco":
        return CocoSource(str(location), cfg.source, screening, image_root=image_root)
    if image_root is not None:
        raise SourceError(f"--images is for COCO sources only; a {kind} source finds its images itself")
    return _SOURCES[kind](str(location), cfg.source, screening)
