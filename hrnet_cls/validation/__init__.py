"""Validation sweeps for validate.py: ``specs`` makes the rows, ``passes`` runs them, ``report`` writes them
(docs/design.md §4.9, §5.5, §7.1). A step that can fail on one rank alone all_gathers the failures, so every rank
drops the same rows."""
from hrnet_cls.validation.passes import PassStats, SweepSettings, expected_samples, plan_passes, run_pass, run_sweep
from hrnet_cls.validation.report import (RESULT_COLUMNS, RESULT_FORMATS, TIMM_COLUMNS, format_table, row_record,
                                        write_results)
from hrnet_cls.validation.specs import (ModelSpec, Preprocess, Row, SweepError, build_rows, checkpoint_specs, describe,
                                       describe_all, model_specs)

__all__ = [
    "ModelSpec", "PassStats", "Preprocess", "RESULT_COLUMNS", "RESULT_FORMATS", "Row", "SweepError", "SweepSettings",
    "TIMM_COLUMNS", "build_rows",
    "checkpoint_specs", "describe", "describe_all", "expected_samples", "format_table", "model_specs",
    "plan_passes", "row_record", "run_pass", "run_sweep", "write_results",
]
