"""A sweep's rows as a console table and a CSV or JSON results file, timm's validate.py columns first in timm's
order, so rows line up with timm's ``results-imagenet.csv`` (columns: README "Validation and sweeps")."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hrnet_cls.atomic import write_atomic
from hrnet_cls.models.hrnet_c import PAPER_TOP1
from hrnet_cls.validation.specs import Row

TIMM_COLUMNS = ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                "interpolation")
RESULT_COLUMNS = TIMM_COLUMNS + ("checkpoint", "loss", "samples", "skipped", "expected_samples", "verified",
                                 "precision", "device", "images_per_s", "gmacs", "paper_top1", "top1_minus_paper",
                                 "error")
RESULT_FORMATS = ("csv", "json")


def paper_top1(row: Row) -> float | None:
    """The published ImageNet top-1 of the row's variant; None unless it has 1000 classes."""
    desc = row.spec.desc
    if desc is None or desc.num_classes != 1000:
        return None
    return PAPER_TOP1.get(row.spec.model.split(".")[0])


def row_record(row: Row) -> dict[str, Any]:
    """The results file's row: RESULT_COLUMNS in order (None where there is no value)."""
    paper = paper_top1(row)
    desc = row.spec.desc
    values = dict(
        model=row.spec.model, top1=row.top1, top1_err=None if row.top1 is None else 100.0 - row.top1,
        top5=row.top5, top5_err=None if row.top5 is None else 100.0 - row.top5,
        param_count=None if row.params is None else round(row.params / 1e6, 2), img_size=row.img_size,
        crop_pct=row.crop_pct, interpolation=desc.interpolation if desc else None, checkpoint=row.spec.label,
        loss=row.loss, samples=row.samples, skipped=row.skipped, expected_samples=row.expected_samples,
        verified=row.spec.verified, precision=row.precision or None, device=row.device or None,
        images_per_s=row.images_per_s, gmacs=row.gmacs, paper_top1=paper,
        top1_minus_paper=None if paper is None or row.top1 is None else row.top1 - paper, error=row.error)
    return {column: values[column] for column in RESULT_COLUMNS}


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


# (header, record key, format, align) of the console table
_TABLE = (("model", "model", "", "<"), ("checkpoint", "checkpoint", "", "<"), ("img", "img_size", "d", ">"),
          ("crop", "crop_pct", ".3f", ">"), ("top1", "top1", ".3f", ">"), ("top5", "top5", ".3f", ">"),
          ("loss", "loss", ".4f", ">"), ("samples", "samples", "d", ">"), ("bad", "skipped", "d", ">"),
          ("expected", "expected_samples", "d", ">"), ("params(M)", "param_count", ".2f", ">"),
          ("GMACs", "gmacs", ".4f", ">"), ("img/s", "images_per_s", ".1f", ">"), ("paper", "paper_top1", ".1f", ">"),
          ("vs paper", "top1_minus_paper", "+.2f", ">"))


def format_table(rows: Sequence[Row]) -> str:
    """The console table, each column as wide as its widest cell; failed rows show FAILED, their errors below."""
    cells = []
    for row in rows:
        record = row_record(row)
        line = [_cell(record[key], fmt) for _, key, fmt, _ in _TABLE]
        if row.error:
            line[4] = "FAILED"
        cells.append(line)
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (header, *_) in enumerate(_TABLE)]

    def join(line: list[str]) -> str:
        return "  ".join(f"{cell:{align}{width}}" for cell, width, (*_, align) in zip(line, widths, _TABLE))
    header = join([header for header, *_ in _TABLE])
    lines = [header, "-" * len(header), *map(join, cells)]
    failed = [row.error for row in rows if row.error]
    if failed:
        lines += ["", f"{len(failed)} of {len(rows)} row(s) failed:"] + [f"  {error}" for error in failed]
    return "\n".join(lines)


def results_format(path: str | Path, fmt: str = "") -> str:
    """``fmt`` (csv | json, as timm's --results-format), else json for a .json file, else csv."""
    return fmt or ("json" if Path(path).suffix.lower() == ".json" else "csv")


def write_results(rows: Sequence[Row], path: str | Path, fmt: str = "") -> None:
    """Rows as CSV (empty cells for missing values) or a JSON list (nulls), as results_format chooses; atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [row_record(row) for row in rows]
    if results_format(path, fmt) == "json":
        write_atomic(path, json.dumps(records, indent=1) + "\n")
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in records)
    write_atomic(path, text.getvalue())
