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
from typing import Callable

from ovseg_mine.export.command import trainer_command
from ovseg_mine.export.crops import png_bytes
from ovseg_mine.export.openclip_csv import DEFAULT_TEMPLATE
from ovseg_mine.export.pairs import (
    ExportError,
    ExportResult,
    PairFilter,
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

    def done(ordinal: int, _key: str) -> bool:
        return os.path.isfile(os.path.join(out, tar_name(ordinal // per_tar)))

    sizes: dict[str, int] = {}
    writer, current, written = None, -1, 0

    def close() -> None:
        if writer is not None:
            writer.close()
            path = os.path.join(out, tar_name(current))
            os.replace(f"{path}.tmp", path)

    try:
        for sample in pairs.samples(filt, found, written=done):
            index = sample.ordinal // per_tar
            name = tar_name(index)
            if sample.crop is None:  # its tar was written by an earlier call: counted once
                if name not in sizes:
                    sizes[name] = _count_samples(os.path.join(out, name))
            else:
                if index != current:
                    close()
                    writer, current = wds.TarWriter(os.path.join(out, f"{name}.tmp")), index
                writer.write(
                    {
                        "__key__": sample.key,
                        "png": png_bytes(sample.crop),
                        "txt": title(template, sample.row["noun"]),
                        "json": sample.meta(),
                    }
                )
                sizes[name] = sizes.get(name, 0) + 1
                written += 1
            if on_pair is not None:
                on_pair()
        close()
        writer = None
    finally:
        if writer is not None:  # stopped mid-tar: its partial file is removed, the finished tars stay
            writer.close()
            os.remove(os.path.join(out, f"{tar_name(current)}.tmp"))
    write_json(os.path.join(out, SIZES_FILE), sizes)
    tars = [os.path.join(out, name) for name in sorted(sizes)]
    last = max((int(n[len("shard-") : -len(".tar")]) for n in sizes), default=0)
    pattern = os.path.join(out, tar_name(0) if last == 0 else f"shard-{{00000..{last:05d}}}.tar")
    command = trainer_command(pairs.manifest, ["--train-data", pattern, "--dataset-type", "webdataset"])
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
    return ExportResult(out, total, written, tars, pairs.skipped, pairs.unfinished, command)
