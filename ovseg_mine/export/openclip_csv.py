"""``export --format openclip-csv``: one PNG per pair and a tab-separated ``train.csv``, as OVSeg trained its CLIP.

OVSeg's ``open_clip_training/src/scripts/coco_proposal_1cap_finetune_VitL.sh`` runs ``training.main --dataset-type
csv`` on such a CSV (columns ``filepath`` and ``title``, tab-separated: open_clip_train's ``--csv-img-key``,
``--csv-caption-key`` and ``--csv-separator`` defaults). The CSV text of OVSeg's own data is not published; the
title here is ``--template`` with the noun (default ``"a photo of a {}."``).

Layout::

    OUT/crops/IMAGEID-HASH.png   the pair's masked crop (ovseg_mine.export.crops), written whole
    OUT/train.csv                filepath (absolute) <TAB> title, one row per pair, in shard order
    OUT/export.json              settings (run, filters, template), counts, skipped pairs, the trainer command

A rerun into the same folder keeps the PNGs already written and rewrites the CSV.
"""

from __future__ import annotations

import csv
import os
from typing import Callable

from ovseg_mine.export.command import trainer_command
from ovseg_mine.export.crops import png_bytes
from ovseg_mine.export.pairs import (
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

CSV_FILE = "train.csv"
CROPS_DIR = "crops"
DEFAULT_TEMPLATE = "a photo of a {}."


def export_csv(
    run: str,
    out: str,
    *,
    template: str = DEFAULT_TEMPLATE,
    filt: PairFilter | None = None,
    images: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_pair: Callable[[], None] | None = None,
) -> ExportResult:
    """Export a run's pairs as masked-crop PNGs and an open_clip_train CSV.

    Args:
        run: the run folder (a local path or a URI).
        out: a local output folder (created).
        template: the title of each row; ``{}`` is replaced by the noun.
        filt: which pairs (:class:`~ovseg_mine.export.pairs.PairFilter`).
        images: image root replacing the manifest's.
        on_start: called once with the number of pairs to export; on_pair: after each pair.

    Returns:
        An :class:`~ovseg_mine.export.pairs.ExportResult`.

    Raises:
        ExportError: a bad run (damaged shard, not a run), template or output folder; nothing is written then.
    """
    check_template(template)
    filt = filt or PairFilter()
    pairs = open_run(run)
    settings = {"format": "openclip-csv", "run": pairs.run.uri, "template": template, "filter": filt.to_dict()}
    out = prepare_out(out)
    check_settings(out, settings)
    found = run_images(pairs, images)
    crops = os.path.join(out, CROPS_DIR)
    os.makedirs(crops, exist_ok=True)
    if on_start is not None:
        on_start(pairs.count(filt))
    rows, written = [], 0

    def exists(_ordinal: int, key: str) -> bool:
        return os.path.isfile(os.path.join(crops, f"{key}.png"))

    for sample in pairs.samples(filt, found, written=exists):
        path = os.path.join(crops, f"{sample.key}.png")
        if sample.crop is not None:
            with open(f"{path}.tmp", "wb") as handle:
                handle.write(png_bytes(sample.crop))
            os.replace(f"{path}.tmp", path)
            written += 1
        rows.append((path, title(template, sample.row["noun"])))
        if on_pair is not None:
            on_pair()
    csv_path = os.path.join(out, CSV_FILE)
    with open(f"{csv_path}.tmp", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    os.replace(f"{csv_path}.tmp", csv_path)
    data = ["--train-data", csv_path, "--dataset-type", "csv", "--csv-img-key", "filepath"]
    data += ["--csv-caption-key", "title", "--train-num-samples", str(len(rows))]
    command = trainer_command(pairs.manifest, data)
    write_json(
        settings_file(out),
        {
            "settings": settings,
            "pairs": len(rows),
            "skipped": pairs.skipped,
            "unfinished_shards": pairs.unfinished,
            "command": command,
        },
    )
    return ExportResult(out, len(rows), written, [csv_path], pairs.skipped, pairs.unfinished, command)
