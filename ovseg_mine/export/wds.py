"""``export --format webdataset``: tars of masked crops as open_clip_train and img2dataset lay them out.

Each sample is ``KEY.png`` (the masked crop, :mod:`ovseg_mine.export.crops`), ``KEY.txt`` (the title: ``--template``
with the noun) and ``KEY.json`` (pair id, image id, noun, caption, scores, bbox XYWH); at most ``per_tar`` (1,000)
samples per tar, written with the ``webdataset`` library's ``TarWriter``. ``sizes.json`` beside the tars gives
each tar's sample count, which open_clip_train reads instead of ``--train-num-samples``.

Layout::

    OUT/shard-00000.tar ...   written whole (a temporary name, then a rename): a rerun keeps the finished ones
    OUT/sizes.json            {"shard-00000.tar": 1000, ...}
    OUT/export.json           settings, counts, skipped pairs, the trainer command
"""

from __future__ import annotations

import os
import tarfile
from typing import Any, Callable

from ovseg_mine.export.command import trainer_command
from ovseg_mine.export.crops import png_bytes
from ovseg_mine.export.images import RunImages
from ovseg_mine.export.openclip_csv import DEFAULT_TEMPLATE
from ovseg_mine.export.pairs import (
    ExportError,
    ExportResult,
    PairFilter,
    RunPairs,
    check_settings,
    check_template,
    open_run,
    prepare_out,
    run_images,
    settings_file,
    title,
    write_json,
)

SAMPLES_PER_TAR = 1000
SIZES_FILE = "sizes.json"


def tar_name(index: int) -> str:
    """``shard-00042.tar``."""
    return f"shard-{index:05d}.tar"


def _count_samples(path: str) -> int:
    """The number of samples (distinct keys) in a finished tar."""
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def export_webdataset(
    run: str,
    out: str,
    *,
    template: str = DEFAULT_TEMPLATE,
    filt: PairFilter | None = None,
    images: str | None = None,
    per_tar: int = SAMPLES_PER_TAR,
    on_start: Callable[[int], None] | None = None,
    on_pair: Callable[[], None] | None = None,
) -> ExportResult:
    """Export a run's pairs as webdataset tars with ``sizes.json``.

    Args:
        run: the run folder (a local path or a URI).
        out: a local output folder (created).
        template: the ``KEY.txt`` text; ``{}`` is replaced by the noun.
        filt: which pairs.
        images: image root replacing the manifest's.
        per_tar: samples per tar at most (pair ``i`` of the export goes to tar ``i // per_tar``).
        on_start, on_pair: progress callbacks (pairs to export; after each pair).

    Returns:
        An :class:`~ovseg_mine.export.pairs.ExportResult` (``files``: the tars).

    Raises:
        ExportError: a bad run, template or output folder; nothing is written then.
    """
    try:
        import webdataset as wds
    except ImportError as exc:
        raise ExportError("--format webdataset needs the webdataset library: pip install 'webdataset<=0.2.86'") from exc
    check_template(template)
    filt = filt or PairFilter()
    pairs = open_run(run)
    settings = {
        "format": "webdataset",
        "run": pairs.run.uri,
        "template": template,
        "filter": filt.to_dict(),
        "per_tar": per_tar,
    }
    out = prepare_out(out)
    check_settings(out, settings)
    found = run_images(pairs, images)
    if on_start is not None:
        on_start(pairs.count(filt))
    tars = _TarSeries(out, wds.TarWriter)
    sizes, written = _write_samples(pairs, filt, found, tars, template=template, per_tar=per_tar, on_pair=on_pair)
    write_json(os.path.join(out, SIZES_FILE), sizes)
    files = [os.path.join(out, name) for name in sorted(sizes)]
    command = trainer_command(pairs.manifest, ["--train-data", _train_data(out, sizes), "--dataset-type", "webdataset"])
    total = sum(sizes.values())
    write_json(
        settings_file(out),
        {
            "settings": settings,
            "pairs": total,
            "skipped": pairs.skipped,
            "unfinished_shards": pairs.unfinished,
            "command": command,
        },
    )
    return ExportResult(out, total, written, files, pairs.skipped, pairs.unfinished, command)


class _TarSeries:
    """The numbered tars of an export, one open at a time as ``NAME.tmp`` and renamed to ``NAME`` once complete."""

    def __init__(self, out: str, tar_writer: Callable[[str], Any]) -> None:
        self.out, self.tar_writer = out, tar_writer
        self.writer: Any = None
        self.current = -1  # the index of the open tar

    def write(self, index: int, sample: dict[str, Any]) -> None:
        """Write a sample to tar ``index``, completing the open tar first if it is another one."""
        if index != self.current:
            self.complete()
            self.writer, self.current = self.tar_writer(os.path.join(self.out, f"{tar_name(index)}.tmp")), index
        self.writer.write(sample)

    def complete(self) -> None:
        """Close the open tar, if any, and rename it into place."""
        if self.writer is not None:
            self.writer.close()
            path = os.path.join(self.out, tar_name(self.current))
            os.replace(f"{path}.tmp", path)
            self.writer = None

    def abandon(self) -> None:
        """Close the open tar, if any, and remove its partial file (the complete tars stay)."""
        if self.writer is not None:
            self.writer.close()
            os.remove(os.path.join(self.out, f"{tar_name(self.current)}.tmp"))
            self.writer = None


def _write_samples(
    pairs: RunPairs,
    filt: PairFilter,
    found: RunImages,
    tars: _TarSeries,
    *,
    template: str,
    per_tar: int,
    on_pair: Callable[[], None] | None,
) -> tuple[dict[str, int], int]:
    """Write the pairs' samples to the tars not written by an earlier call: (samples per tar name, samples written)."""

    def done(ordinal: int, _key: str) -> bool:
        return os.path.isfile(os.path.join(tars.out, tar_name(ordinal // per_tar)))

    sizes: dict[str, int] = {}
    written = 0
    try:
        for sample in pairs.samples(filt, found, written=done):
            index = sample.ordinal // per_tar
            name = tar_name(index)
            if sample.crop is None:  # its tar was written by an earlier call: counted once
                if name not in sizes:
                    sizes[name] = _count_samples(os.path.join(tars.out, name))
            else:
                tars.write(
                    index,
                    {
                        "__key__": sample.key,
                        "png": png_bytes(sample.crop),
                        "txt": title(template, sample.row["noun"]),
                        "json": sample.meta(),
                    },
                )
                sizes[name] = sizes.get(name, 0) + 1
                written += 1
            if on_pair is not None:
                on_pair()
        tars.complete()
    finally:
        tars.abandon()  # stopped mid-tar: its partial file is removed, the finished tars stay
    return sizes, written


def _train_data(out: str, sizes: dict[str, int]) -> str:
    """open_clip_train's ``--train-data`` for the tars: ``OUT/shard-00000.tar`` or ``OUT/shard-{00000..000NN}.tar``."""
    last = max((int(n[len("shard-") : -len(".tar")]) for n in sizes), default=0)
    return os.path.join(out, tar_name(0) if last == 0 else f"shard-{{00000..{last:05d}}}.tar")
