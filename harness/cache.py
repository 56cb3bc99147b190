"""A content-addressed artifact cache: the key is a hash of everything that shapes the artifact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

DEFAULT_ROOT = Path(os.environ.get("EDGE_PARITY_CACHE", Path.home() / ".cache" / "edge-parity"))


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: Path, pattern: str = "*.safetensors") -> str:
    """Digest of the weight files of a checkpoint directory."""
    h = hashlib.sha256()
    for file in sorted(Path(path).glob(pattern)):
        h.update(file.name.encode())
        h.update(file_digest(file).encode())
    return h.hexdigest()


class ArtifactCache:
    """Artifacts live in <root>/<kind>/<key>/, each with the key parts beside it in key.json."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = Path(root) if root else DEFAULT_ROOT
        self.enabled = enabled
        self.hits: list[str] = []
        self.misses: list[str] = []

    def get_or_build(self, kind: str, parts: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """Returns the artifact directory, building it (atomically) on a miss or when disabled."""
        key = cache_key(parts)
        final = self.root / kind / key
        if self.enabled and (final / "key.json").exists():
            self.hits.append(f"{kind}/{key}")
            return final
        self.misses.append(f"{kind}/{key}")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            build(staging)
            (staging / "key.json").write_text(json.dumps(parts, sort_keys=True, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final
