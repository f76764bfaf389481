"""A sweep's rows as a console table and as a CSV or JSON results file."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hrnet_cls.atomic import write_atomic
from hrnet_cls.hrnet_c import PAPER_TOP1
from hrnet_cls.validation.specs import Row

RESULT_COLUMNS = ("model", "checkpoint", "verified", "img_size", "crop_pct", "top1", "top5", "samples", "skipped",
                  "expected_samples", "params", "gmacs", "images_per_s", "paper_top1", "top1_minus_paper", "error")


def row_record(row: Row) -> dict[str, Any]:
    """The results file's row: RESULT_COLUMNS in order."""
    paper = PAPER_TOP1.get(row.spec.model.split(".")[0])
    gap = None if paper is None or row.top1 is None else row.top1 - paper
    values = dict(model=row.spec.model, checkpoint=row.spec.label, verified=row.spec.verified, paper_top1=paper,
                  top1_minus_paper=gap,
                  **{f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name != "spec"})
    return {column: values[column] for column in RESULT_COLUMNS}


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_table(rows: Sequence[Row]) -> str:
    """The console table; failed rows show FAILED and their errors are listed below it."""
    header = (f"{'model':<24} {'checkpoint':<32} {'img':>4} {'crop':>6} {'top1':>7} {'top5':>7} {'samples':>8} "
              f"{'bad':>5} {'expected':>8} {'params(M)':>9} {'GMACs':>8} {'img/s':>8} {'paper':>6} {'vs paper':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        d = row_record(row)
        label = d["checkpoint"] if len(d["checkpoint"]) <= 32 else "..." + d["checkpoint"][-29:]
        result = "FAILED" if row.error else _cell(d["top1"], ".3f")
        lines.append(
            f"{d['model']:<24} {label:<32} {_cell(d['img_size'], 'd'):>4} {_cell(d['crop_pct'], '.3f'):>6} "
            f"{result:>7} {_cell(d['top5'], '.3f'):>7} {_cell(d['samples'], 'd'):>8} {_cell(d['skipped'], 'd'):>5} "
            f"{_cell(d['expected_samples'], 'd'):>8} {_cell(d['params'] and d['params'] / 1e6, '.3f'):>9} "
            f"{_cell(d['gmacs'], '.4f'):>8} {_cell(d['images_per_s'], '.1f'):>8} {_cell(d['paper_top1'], '.1f'):>6} "
            f"{_cell(d['top1_minus_paper'], '+.2f'):>8}")
    failed = [row.error for row in rows if row.error]
    if failed:
        lines += ["", f"{len(failed)} of {len(rows)} row(s) failed:"] + [f"  {error}" for error in failed]
    return "\n".join(lines)


def write_results(rows: Sequence[Row], path: str | Path) -> None:
    """Rows as CSV (RESULT_COLUMNS, empty cells for missing values) or as a JSON list of
    objects (null for missing values), chosen by the file's suffix; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [row_record(row) for row in rows]
    if path.suffix.lower() == ".json":
        write_atomic(path, json.dumps(records, indent=1) + "\n")
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in records)
    write_atomic(path, text.getvalue())
