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

What a run mines is one checked value, :class:`~ovseg_mine.mine.sources.mine_input.MineInput` (the source kind and
location, COCO's image root, the masks' kind and location), with the registry of kinds and :func:`build_source`:
:mod:`~ovseg_mine.mine.sources.mine_input`.

Masks the user already has (``--proposals KIND:LOCATION``) are read here too:
:mod:`~ovseg_mine.mine.sources.proposal_files` (COCO instances or panoptic, SA-1B JSON: an index, attached to the
records by the read step); :mod:`~ovseg_mine.mine.algorithms.given_proposals` turns a record's masks into the
proposals the engine matches.
"""

from __future__ import annotations

from ovseg_mine.mine.sources.base import Reject, ShardTask, Source, SourceError, SourcePlan
from ovseg_mine.mine.sources.coco import CocoCaptions, ImageRecord, read_coco_captions
from ovseg_mine.mine.sources.mine_input import MineInput, build_source, list_sources, parse_source

__all__ = [
    "CocoCaptions",
    "ImageRecord",
    "MineInput",
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
