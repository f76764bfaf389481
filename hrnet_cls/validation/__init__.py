"""Validation sweeps: checkpoints x models x image sizes x crop ratios over one set of val shards.

A *row* is one set of weights (one of our training checkpoints, a weights file for a timm
model, or timm's pretrained weights) evaluated at one (img_size, crop_pct). Steps:

1. ``specs``: ``checkpoint_specs`` / ``model_specs`` turn the command line into
   ``ModelSpec`` s; ``describe_all`` reads each one's model name, classes and default
   preprocessing (a hrnet_cls.models.description.ModelDescription: from the checkpoint's config, or the
   model's pretrained_cfg), and
   ``build_rows`` takes the product with the requested image sizes and crop ratios;
2. ``passes``: ``run_sweep`` groups the rows by preprocessing (img_size, crop_pct,
   interpolation, mean, std) and validates each group in one *pass*: one loader, every
   batch decoded once and fed to each model of the group (hrnet_cls.validation.evaluation);
3. ``report``: the console table and the CSV / JSON results file.

Exact numbers: each sample is read by exactly one (rank, worker) slot of the val loader
(no padding), correct counts are integers summed with all_reduce, and a row whose samples
+ bad samples differ from the count in _info.json carries an error.

Distributed: every step that can fail on one rank only (describing a checkpoint, loading
the models of a pass, running one) ends in an all_gather of the failures, so all ranks drop
the same rows and reach the same collectives. Nothing inside the batch loop communicates:
ranks with different numbers of batches never wait on each other.

Failures of a row (missing or truncated file, weights of another architecture or shape,
unknown model name, a forward that raises) become one-line ``Row.error`` texts naming the
file and the problem; the sweep goes on with the other rows.
"""
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
