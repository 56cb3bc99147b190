"""A content-addressed artifact cache: the key is a hash of everything that shapes the artifact.

Same inputs, same artifact; different inputs, different artifact: a key holds the code that builds an
artifact (the harness's own, by source, and the converter libraries', by digest of their installed
files), its inputs and settings. Every entry carries a manifest of its files' digests, checked on each
hit, so a damaged entry is rebuilt rather than served. A private cache (`--no-cache`) builds in a
directory of its own and never publishes to the shared one.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"  # {file name: sha256} of an entry, written when it is built
KEY_FILE = "key.json"
CODE_DIGESTS = "code-digests.json"  # the memo of provenance.code_digests


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
    """Digest of the weight files of a checkpoint directory. Remembered in the process while no file is replaced or
    written to: a run's keys ask for a real model's 1 GB of weights several times (~1 s each)."""
    stats = [(file.name, file.stat()) for file in sorted(Path(path).glob(pattern))]
    return _files_digest(str(Path(path).resolve()), tuple(
        (name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats))


@functools.lru_cache(maxsize=64)
def _files_digest(directory: str, files: tuple[tuple[str, int, int, int, int], ...]) -> str:
    """Digest of `files` (name, size, inode, times) of `directory`, by name and content."""
    h = hashlib.sha256()
    for name, *_ in files:
        h.update(name.encode())
        h.update(file_digest(Path(directory) / name).encode())
    return h.hexdigest()


def _manifest(directory: Path) -> dict[str, str]:
    return {f.name: file_digest(f) for f in sorted(directory.iterdir())
            if f.is_file() and f.name not in (MANIFEST, KEY_FILE)}


class ArtifactCache:
    """Artifacts live in <root>/<kind>/<key>/ with their key parts (key.json) and file digests (manifest.json).

    `shared=False` (what --no-cache gives) builds every artifact afresh in a private directory that is
    removed by `close()`: nothing it builds can replace or poison an entry of the shared cache. A private cache
    may `borrow` kinds: it is served the shared cache's entries of those kinds (checked as any hit), so a test
    that patches the lowering or the converter reuses the checkpoint and programs its patch cannot shape; what it
    builds still stays private.
    """

    def __init__(self, root: Path | None = None, shared: bool = True, borrow: tuple[str, ...] = ()):
        from harness.config import default_cache_dir

        if shared and borrow:
            raise ValueError("only a private cache (shared=False) borrows from the shared one")
        self.root = Path(root) if root else Path(default_cache_dir())
        self.shared = shared
        self.borrow = tuple(borrow)
        self._private = None if shared else Path(tempfile.mkdtemp(prefix="edge-parity-private-"))
        self.hits: list[str] = []
        self.misses: list[str] = []
        self.rebuilt: list[str] = []  # entries whose files no longer matched their manifest
        self.served: dict[str, dict[str, str]] = {}  # kind/key -> {file: sha256} of every artifact handed out

    @property
    def store(self) -> Path:
        """Where entries are read and written: the shared root, or this run's private directory."""
        return self.root if self._private is None else self._private

    def code_digests(self) -> dict[str, dict[str, str]]:
        """The converter libraries' code and versions, for keys (memoised beside the shared cache)."""
        from harness.provenance import library_code

        memo = self.root / CODE_DIGESTS if self.shared else None
        return library_code(memo)

    def lookup(self, kind: str, parts: dict[str, Any], count_hit: bool = False) -> Path | None:
        """The entry's directory if it exists and its files match their manifest (a borrowed kind's from the shared
        cache if it holds it); None otherwise. `count_hit`: a found entry is used as it is, and tallied a hit."""
        key = cache_key(parts)
        name, entry = f"{kind}/{key}", self.store / kind / key
        if kind in self.borrow and not (entry / KEY_FILE).exists():
            entry = self.root / kind / key
        if not (entry / KEY_FILE).exists():
            return None
        manifest = self._read_manifest(entry)
        if manifest is None or _manifest(entry) != manifest:
            if name not in self.rebuilt:
                self.rebuilt.append(name)
            return None
        self.served[name] = manifest
        if count_hit:
            self.hits.append(name)
        return entry

    def get_or_build(self, kind: str, parts: dict[str, Any], build: Callable[[Path], None]) -> Path:
        """Returns the artifact directory, building it (atomically) on a miss, a damaged entry, or privately.
        Processes sharing the cache (pairs side by side, a test run beside a verify) build an entry once: the
        others wait for it on its lock file (<kind>/<key>.lock) and are served what it built."""
        key = cache_key(parts)
        final = self.store / kind / key
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(final.parent / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._get_or_build(kind, parts, build, key, final)
        finally:
            os.close(lock)  # releases the lock

    def _get_or_build(self, kind: str, parts: dict[str, Any], build: Callable[[Path], None], key: str,
                      final: Path) -> Path:
        name = f"{kind}/{key}"
        found = self.lookup(kind, parts)
        if found is not None:
            self.hits.append(name)
            return found
        self.misses.append(name)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            build(staging)
            manifest = _manifest(staging)
            (staging / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1))
            (staging / KEY_FILE).write_text(json.dumps(parts, sort_keys=True, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.served[name] = manifest
        return final

    @staticmethod
    def _read_manifest(entry: Path) -> dict[str, str] | None:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return manifest if isinstance(manifest, dict) else None

    @contextlib.contextmanager
    def scope(self):
        """Counts what happens inside the block: {hits, misses, rebuilt_damaged} (one pair's share of a run)."""
        tally = {"hits": 0, "misses": 0, "rebuilt_damaged": 0}
        before = (len(self.hits), len(self.misses), len(self.rebuilt))
        try:
            yield tally
        finally:
            now = (len(self.hits), len(self.misses), len(self.rebuilt))
            tally.update(zip(tally, (b - a for a, b in zip(before, now))))

    def close(self) -> None:
        """Removes a private cache's directory; the shared cache stays."""
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)

    def __enter__(self) -> ArtifactCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
