"""Golden outputs: what every stage of a pair produced at the last release, to say what moved since.

Parity against HF says a conversion is right today; a golden says what changed since it was
recorded (a new litert-torch, transformers, TensorFlow or model definition). One JSON file per
pair in golden/, written by `harness golden update` only. Split the way snapshot tools split
snapshots: `serialise` (record a document, its text and its validation), `store` (files),
`compare` (the `golden` check) and `update` (re-record and diff). The release gate's summary,
rendered and written with the other reports, lives in harness/report.py.
"""

from harness.golden.compare import GoldenCheck, drift_records, provenance_changes, recording_drift_records, stage_drift
from harness.golden.serialise import (DECIMALS, GOLDEN, SCHEMA_VERSION, TOP_K, dumps, parse, record, record_stage,
                                      reference_key, update_command)
from harness.golden.store import DEFAULT_GOLDEN_DIR, MissingGolden, golden_path, load, save, stale_files
from harness.golden.update import UpdateOutcome, recipes_to_record, render_diff, update

__all__ = [
    "DECIMALS", "DEFAULT_GOLDEN_DIR", "GOLDEN", "GoldenCheck", "MissingGolden", "SCHEMA_VERSION", "TOP_K",
    "UpdateOutcome", "drift_records", "dumps", "golden_path", "load", "parse", "provenance_changes", "recipes_to_record",
    "record", "record_stage", "recording_drift_records", "reference_key", "render_diff", "save",
    "stage_drift", "stale_files", "update", "update_command",
]
