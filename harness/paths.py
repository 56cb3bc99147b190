"""Paths as reports show them: never an absolute path of the machine a run was made on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def display_path(path: str | os.PathLike) -> str:
    """Relative to the project, under ~, under $EDGE_PARITY_CACHE or $TMPDIR; anything else by its name."""
    resolved = Path(path).expanduser().resolve()
    anchors = [(PROJECT_ROOT, "")]
    if os.environ.get("EDGE_PARITY_CACHE"):
        anchors.append((Path(os.environ["EDGE_PARITY_CACHE"]).expanduser().resolve(), "$EDGE_PARITY_CACHE"))
    anchors += [(Path.home().resolve(), "~"), (Path(tempfile.gettempdir()).resolve(), "$TMPDIR")]
    for anchor, label in anchors:
        try:
            rest = resolved.relative_to(anchor)
        except ValueError:
            continue
        if not label:
            return str(rest) if str(rest) != "." else "."
        return label if str(rest) == "." else f"{label}/{rest}"
    return f".../{resolved.name}"


def scrub(text: str) -> str:
    """A message (a traceback tail, say) with this machine's directories replaced by their labels."""
    import sys

    anchors = [(str(PROJECT_ROOT), "."), (sys.prefix, "$PYTHON_PREFIX"), (sys.base_prefix, "$PYTHON_BASE")]
    if os.environ.get("EDGE_PARITY_CACHE"):
        anchors.append((str(Path(os.environ["EDGE_PARITY_CACHE"]).expanduser()), "$EDGE_PARITY_CACHE"))
    anchors += [(tempfile.gettempdir(), "$TMPDIR"), (str(Path.home()), "~")]
    for anchor, label in sorted(anchors, key=lambda a: -len(a[0])):  # the most specific first
        text = text.replace(anchor, label)
    return text
