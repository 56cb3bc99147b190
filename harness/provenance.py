"""What a run and its artifacts were made with: the installed code of the conversion chain, the harness commit.

A version number does not say which code ran: an editable or patched litert-torch keeps its version
while its converter changes (the very change a release gate judges). Artifacts are therefore keyed by
a digest of the installed files of every library that shapes them. Hashing ~350 MB of installed code
takes ~2 s, so each digest is memoised beside the cache under the files' sizes and mtimes (as git's
index and ccache's direct mode do): a file rewritten in place changes its mtime and so the digest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
from pathlib import Path

from harness.paths import PROJECT_ROOT
from harness.records import library_versions

# The libraries whose code shapes a flatbuffer: converter, lowering, quantizer, runtime.
CONVERTER_LIBRARIES = ("litert-torch", "litert-converter", "ai-edge-quantizer", "ai-edge-litert")
# Libraries too large to hash on every run, keyed by their exact version instead.
VERSIONED_LIBRARIES = ("torch", "tensorflow-cpu", "tensorflow", "transformers", "safetensors", "numpy")


def _top_level(dist: importlib.metadata.Distribution) -> list[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return sorted({line.strip() for line in text.splitlines() if line.strip()})
    names = set()
    for file in dist.files or ():
        head = file.parts[0]
        if not head.endswith((".dist-info", ".data", ".pth")) and not head.startswith(("__editable__", "..")):
            names.add(head[:-3] if head.endswith(".py") else head)
    return sorted(names)


def _package_files(name: str) -> list[tuple[str, Path]]:
    """The files of an importable top-level package or module, wherever it is installed (editable too),
    each with its path inside the package."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return []
    if spec.submodule_search_locations:
        files = []
        for location in spec.submodule_search_locations:
            for root, dirs, names in os.walk(location):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                files += [(str(Path(name, os.path.relpath(root, location), n)), Path(root) / n)
                          for n in sorted(names) if not n.endswith(".pyc")]
        return files
    return [(Path(spec.origin).name, Path(spec.origin))] if spec.origin and Path(spec.origin).is_file() else []


def distribution_files(distribution: str) -> list[tuple[str, Path]]:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return []
    return [f for name in _top_level(dist) for f in _package_files(name)]


def _stat_key(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for _, f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _content_digest(files: list[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for name, f in files:
        h.update(f"{name}\0".encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def code_digests(memo: Path | None = None, distributions: tuple[str, ...] = CONVERTER_LIBRARIES) -> dict[str, str]:
    """sha256 of the installed files of each distribution ("absent" when not installed)."""
    known = {}
    if memo is not None and memo.exists():
        try:
            known = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
    digests, changed = {}, False
    for name in distributions:
        files = distribution_files(name)
        if not files:
            digests[name] = "absent"
            continue
        stat = _stat_key(files)
        if known.get(name, {}).get("stat") != stat:
            known[name] = {"stat": stat, "digest": _content_digest(files)}
            changed = True
        digests[name] = known[name]["digest"]
    if memo is not None and changed:
        from harness.report import write_atomic

        write_atomic(memo, json.dumps(known, indent=1, sort_keys=True))
    return digests


def library_code(memo: Path | None = None) -> dict[str, dict[str, str]]:
    """What an artifact key holds of the libraries: converter code by digest, the rest by exact version."""
    return {"code": code_digests(memo), "versions": library_versions(VERSIONED_LIBRARIES)}


def harness_commit(root: Path = PROJECT_ROOT) -> dict[str, object]:
    """The commit the harness ran at and whether its tree had uncommitted changes (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}
