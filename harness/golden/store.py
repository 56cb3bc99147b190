"""Where goldens live: one file per pair in golden/, read back only if recorded for this pair's definition.

The storage of the four parts: paths, reading and writing, and files no pair claims any more; what a
file holds is serialise's business, so the two can change apart.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import GoldenError
from harness.golden.serialise import dumps, parse, reference_key, update_command
from harness.pairs import ModelPair
from harness.paths import PROJECT_ROOT, display_path
from harness.report import write_atomic

DEFAULT_GOLDEN_DIR = PROJECT_ROOT / "golden"


class MissingGolden(GoldenError):
    """No golden file for a pair: a skip for `harness verify`, an error for the release gate."""


def golden_path(golden_dir: Path, model: str) -> Path:
    return Path(golden_dir) / f"{model}.json"


def load(golden_dir: Path, pair: ModelPair) -> dict:
    """The pair's golden, checked to be for this pair's prompts and reference weights."""
    path = golden_path(golden_dir, pair.name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MissingGolden(f"no golden for {pair.name} at {display_path(path)}; record one with "
                            f"`{update_command(pair.name)}`") from None
    doc = parse(text, display_path(path), pair.name)
    fix = f"regenerate it with `{update_command(pair.name)}`"
    if doc["model"] != pair.name:
        raise GoldenError(f"golden file {display_path(path)} is for model {doc['model']!r}, not {pair.name!r}; {fix}")
    if doc["provenance"]["reference_key"] != reference_key(pair):
        raise GoldenError(f"golden file {display_path(path)} was recorded for another definition of {pair.name}: its prompts or "
                          f"reference weights differ (reference key {doc['provenance']['reference_key'][:12]} in the "
                          f"file, {reference_key(pair)[:12]} now: hf_config, workload, seed or init_std "
                          f"changed); {fix}")
    return doc


def read_recorded(golden_dir: Path, model: str) -> dict | None:
    """The model's golden as recorded, even for another definition of the pair; None when there is none
    or it cannot be read, since an update replaces it either way."""
    path = golden_path(golden_dir, model)
    try:
        return parse(path.read_text(), display_path(path), model) if path.exists() else None
    except GoldenError:
        return None


def save(golden_dir: Path, document: dict) -> Path:
    path = golden_path(golden_dir, document["model"])
    write_atomic(path, dumps(document))
    path.chmod(0o644)  # a temp file's 0600 would outlive the rename
    return path


def stale_files(golden_dir: Path, known: set[str]) -> list[Path]:
    """Golden files that match no model pair any more."""
    return [p for p in sorted(Path(golden_dir).glob("*.json")) if p.stem not in known]
