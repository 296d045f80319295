"""Training data from mined shards: a streaming PyTorch dataset of masked crops, their masks and nouns.

Shards hold no pixels: each pair names its image (``file_name``, relative to an image root) and its mask
(COCO RLE). The dataset streams the shards' row groups with pyarrow (only the four columns it needs, one row
group at a time, a bounded shuffle buffer of row metadata), opens each pair's image, renders its masked crop
exactly as mining does (:func:`ovseg_mine.crops.render_masked_crops`: tight box, CLIP mean-pixel fill,
bicubic resize), and keeps the crop's mask (:func:`ovseg_mine.finetune.patch_mask.crop_masks`) for mask
prompt tuning. Augmentation is the reference's ``RandomResizedCrop(scale=(0.9, 1.0))`` (facebookresearch/
ov-seg, ``open_clip_training/src/open_clip/transform.py``), applied identically to crop and mask.

Order is a pure function of (seed, epoch): rows are dealt round-robin to the ``world_size x loader_workers``
streams, so every training worker sees a disjoint share, and an interrupted epoch resumes by skipping rows
without decoding them. Augmentation is seeded per pair, so it does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ovseg_mine.shards import MANIFEST, ShardError, read_file_metadata, read_manifest
from ovseg_mine.storage import Location, StorageError, resolve
from ovseg_mine.verify import verify_shards

log = logging.getLogger("ovseg_mine")
COLUMNS = ("pair_id", "file_name", "noun", "mask")


class DataError(ValueError):
    """Shards that cannot be trained on (no run folder, no shard, unknown schema version, no usable pair)."""


@dataclass
class ShardIndex:
    """What :func:`scan_shards` learned about a run folder, without reading any pixels.

    Attributes:
        run_dir: the run folder (a local path or a URI, resolved).
        image_root: folder the pairs' ``file_name`` is relative to (a local path or a URI, resolved).
        manifest: the run's ``manifest.json`` (empty dict if it has none).
        row_groups: ``(shard path or URI, row group index, rows)`` of every row group, in shard order.
        rows: pairs in the shards.
        missing_images: sorted file names the image root lacks; their pairs are skipped (counted here).
        skipped_rows: pairs skipped because their image is missing.
        shards_id: hex sha256 over the sha256 of each shard file's bytes as verified (not as its marker says), in
            shard order: identifies the exact training data.
        damaged_shards: ``"NAME (reason)"`` of the shards left out with ``skip_damaged``.
    """

    run_dir: Location
    image_root: Location
    manifest: dict[str, Any]
    row_groups: list[tuple[str, int, int]]
    rows: int
    missing_images: list[str] = field(default_factory=list)
    skipped_rows: int = 0
    shards_id: str = ""
    damaged_shards: list[str] = field(default_factory=list)

    @property
    def usable_rows(self) -> int:
        """Pairs whose image exists: ``rows - skipped_rows``."""
        return self.rows - self.skipped_rows


def scan_shards(
    run_dir: str | os.PathLike[str] | Location,
    images: str | os.PathLike[str] | None = None,
    *,
    skip_damaged: bool = False,
) -> ShardIndex:
    """Check a run folder and index its shards for training.

    Every shard file is first checked against its done marker (:func:`ovseg_mine.verify.verify_shards`: its
    sha256 streamed once), so training never starts on a file that is not the one mining committed.

    Args:
        run_dir: output folder of ``ovseg-mine mine`` (``shards/*.parquet``, usually ``manifest.json``): a local
            path or a URI (``s3://``, ``gs://``...).
        images: image root (a path or a URI); default the manifest's ``source.image_root``.
        skip_damaged: leave damaged shards out (logged as warnings, listed in ``damaged_shards``) instead of
            raising.

    Returns:
        A :class:`ShardIndex`. Pairs whose image file is missing are counted and listed, not an error.

    Raises:
        DataError: no run folder, no shard in it, a damaged shard (without ``skip_damaged``; named), a shard of
            an unknown schema version or not an ovseg-mine shard, an unreadable manifest, no image root, or no
            pair with an existing image.
    """
    import pyarrow.parquet as pq

    try:
        run_dir = resolve(run_dir)
        checked = verify_shards(run_dir, skip_damaged=skip_damaged)
        for damaged in checked.damaged:
            log.warning("skipping damaged shard %s", damaged)
        if not checked.shards:
            left = f" ({len(checked.damaged)} damaged shard(s) skipped)" if checked.damaged else ""
            raise DataError(f"{run_dir.join('shards')} holds no shard (shard-*.parquet){left}: nothing to train on")
        for shard in checked.shards:
            read_file_metadata(shard.file)
        manifest = read_manifest(run_dir) if run_dir.join(MANIFEST).is_file() else {}
    except (ShardError, StorageError) as exc:
        raise DataError(str(exc)) from exc
    root = images or manifest.get("source", {}).get("image_root")
    if not root:
        raise DataError(f"{run_dir} has no manifest with source.image_root: pass --images")
    try:
        root = resolve(root)
        if not root.is_dir():
            raise DataError(f"image root {root} is not a folder (pass --images)")
        row_groups, names, digest = [], {}, hashlib.sha256()
        for shard in checked.shards:
            path = shard.file
            digest.update(shard.sha256.encode())  # the bytes as verified now
            with path.open_input() as handle:
                parquet = pq.ParquetFile(handle)
                for g in range(parquet.num_row_groups):
                    row_groups.append((path.uri, g, parquet.metadata.row_group(g).num_rows))
                    for name in parquet.read_row_group(g, columns=["file_name"]).column(0).to_pylist():
                        names[name] = names.get(name, 0) + 1
        exists = _image_exists(root)
        missing = sorted(n for n in names if not exists(n))
    except StorageError as exc:
        raise DataError(str(exc)) from exc
    index = ShardIndex(
        run_dir,
        root,
        manifest,
        row_groups,
        sum(r for _, _, r in row_groups),
        missing,
        sum(names[n] for n in missing),
        digest.hexdigest(),
        [str(d) for d in checked.damaged],
    )
    if index.rows and not index.usable_rows:
        raise DataError(f"none of the {len(names)} images of the pairs is in {root} (e.g. {missing[0]}): pass --images")
    if not index.rows:
        raise DataError(f"the shards of {run_dir} hold no pairs: nothing to train on")
    return index


def _image_exists(root: Location) -> Callable[[str], bool]:
    """Whether ``root/name`` is a file: one stat per name on a local disk; on an object store the root is listed
    once (a request per thousand objects, not one per image)."""
    if root.is_local:
        return lambda name: os.path.isfile(os.path.join(root.path, name))
    listed = {posixpath.relpath(f.path, root.path) for f in root.list_files(recursive=True)}
    return listed.__contains__


def _random_resized_crop(
    rng: random.Random, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop.get_params`` on a size x size image, drawn
    from ``rng`` (torchvision's algorithm: 10 tries of area and log-uniform aspect ratio, else the center)."""
    import math

    area = size * size
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            return rng.randint(0, size - h), rng.randint(0, size - w), h, w
    return 0, 0, size, size


class PairDataset(IterableDataset):
    """Masked crops of mined pairs, streamed from shards.

    Args:
        index: from :func:`scan_shards`.
        size: crop side in pixels (the CLIP input size, :func:`ovseg_mine.models.clip_input_size`).
        mean, std: CLIP normalization per RGB channel, for pixels in [0, 1].
        seed: order and augmentation seed.
        crop_scale: RandomResizedCrop area range; None disables augmentation (evaluation).
        shuffle_buffer: rows of metadata held for shuffling.
        rank, world_size: this training worker among all (Ray Train / DDP).

    Each item is a dict: ``image`` float32 ``[3, size, size]`` CLIP-normalized; ``mask`` bool ``[size, size]``
    (True on the object); ``noun`` str; ``pair_id`` str. A pair whose image cannot be decoded, or whose mask
    does not fit its image, is skipped with a warning on the ``ovseg_mine`` logger.
    """

    def __init__(
        self,
        index: ShardIndex,
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        crop_scale: tuple[float, float] | None = (0.9, 1.0),
        shuffle_buffer: int = 2048,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.index, self.size, self.mean, self.std = index, size, tuple(mean), tuple(std)
        self.seed, self.crop_scale, self.shuffle_buffer = seed, crop_scale, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip_batches, self.batch_size = 0, 0, 1
        self._missing = frozenset(index.missing_images)

    def set_epoch(self, epoch: int, *, skip_batches: int = 0, batch_size: int = 1) -> None:
        """Order of the next iteration: that of ``epoch``, less the first ``skip_batches`` batches of
        ``batch_size`` that this worker's DataLoader already delivered (resume); rows skipped are not decoded."""
        self.epoch, self.skip_batches, self.batch_size = epoch, skip_batches, batch_size

    def _rows(self, stream: int, n_streams: int) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        rng = random.Random(f"{self.seed}:{self.epoch}:order")
        groups = list(self.index.row_groups)
        rng.shuffle(groups)
        position = 0
        for path, group, _rows in groups:
            with resolve(path).open_input() as handle:
                table = pq.ParquetFile(handle).read_row_group(group, columns=list(COLUMNS))
            rows = table.to_pylist()
            rng.shuffle(rows)
            for row in rows:
                mine, position = position % n_streams == stream, position + 1
                if mine and row["file_name"] not in self._missing:
                    yield row

    def _shuffled(self, rows: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for row in rows:
            buffer.append(row)
            if len(buffer) >= self.shuffle_buffer:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream, n_streams = self.rank * workers + worker, self.world_size * workers
        # DataLoader takes batches round-robin from its workers: after k batches, worker w made ceil((k - w) / W).
        skip = max(0, (self.skip_batches - worker + workers - 1) // workers) * self.batch_size
        rng = random.Random(f"{self.seed}:{self.epoch}:{stream}:buffer")
        for row in self._shuffled(self._rows(stream, n_streams), rng):
            if skip:
                skip -= 1
                continue
            item = self.render(row)
            if item is not None:
                yield item

    def render(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """One training item from one pair row (``pair_id``, ``file_name``, ``noun``, ``mask``); None (and a
        warning) when its image cannot be decoded or its mask is empty or of another size than the image."""
        import torch.nn.functional as F

        from ovseg_mine import rle
        from ovseg_mine.crops import CLIP_MEAN_PIXEL, mask_bboxes, normalize, render_masked_crops
        from ovseg_mine.finetune.patch_mask import crop_masks
        from ovseg_mine.images import ImageDecodeError, load_rgb

        try:
            image = torch.from_numpy(load_rgb(self.index.image_root.join(row["file_name"]).uri)).permute(2, 0, 1)
            mask = torch.from_numpy(rle.decode(row["mask"]))[None]
        except (ImageDecodeError, rle.RLEError) as exc:
            log.warning("skipping pair %s: %s", row["pair_id"], exc)
            return None
        if mask.shape[1:] != image.shape[1:] or not mask.any():
            log.warning(
                "skipping pair %s: mask %s does not fit image %s of %s",
                row["pair_id"],
                tuple(mask.shape[1:]),
                tuple(image.shape[1:]),
                row["file_name"],
            )
            return None
        box = mask_bboxes(mask)
        crop = render_masked_crops(image, mask, box, size=self.size, fill=CLIP_MEAN_PIXEL)
        cmask = crop_masks(mask, box, size=self.size)
        if self.crop_scale is not None:
            rng = random.Random(f"{self.seed}:{self.epoch}:{row['pair_id']}")
            top, left, h, w = _random_resized_crop(rng, self.size, self.crop_scale)
            crop = F.interpolate(
                crop[:, :, top : top + h, left : left + w],
                size=(self.size, self.size),
                mode="bicubic",
                align_corners=False,
            )
            part = cmask[:, None, top : top + h, left : left + w].float()
            cmask = F.interpolate(part, size=(self.size, self.size), mode="nearest")[:, 0] > 0.5
        image_t = normalize(crop, self.mean, self.std)[0]
        return {"image": image_t, "mask": cmask[0], "noun": row["noun"], "pair_id": row["pair_id"]}


def steps_per_epoch(index: ShardIndex, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: the usable pairs of one worker's share, in whole batches (at least 1)."""
    return max(1, (index.usable_rows // world_size) // batch_size)


def make_loader(dataset: PairDataset, *, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` with ``workers`` processes (0: in this process); batches are dicts of
    stacked tensors (``image`` ``[B, 3, S, S]``, ``mask`` ``[B, S, S]``) and lists (``noun``, ``pair_id``)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
