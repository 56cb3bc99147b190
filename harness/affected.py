"""Which model pairs a change touches, so a PR re-verifies those and not the whole suite.

A pair is touched by its own file (models/<file>.py, which holds its expected_failures too), its golden,
its [models.<pair>] tables in the gates file; every pair by the harness code, a shared pair helper
(models/_*.py), the pinned dependencies (pyproject.toml), noxfile.py or the [defaults] of the gates.
Tests, docs and CI files touch none. The change is the commits since the merge base with REF plus what
is not committed yet (staged, unstaged, untracked), so a local run sees what CI will see after a push.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from harness.errors import HarnessError
from harness.pairs import DEFAULT_SUITE, FULL_SUITE
from harness.paths import PROJECT_ROOT

GATES_FILE = "harness/gates.toml"
EVERY_PAIR_FILES = {"pyproject.toml": "the pinned dependencies (pyproject.toml)",
                    "noxfile.py": "how runs are installed and started (noxfile.py)"}
ALL = "*"  # the key of reasons that hold for every pair


def _git(root: Path, *args: str, check: bool = True) -> str | None:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        if not check:
            return None
        raise HarnessError(f"git {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:] or ['?']}; "
                           "pass a --base that names a commit of this repository (fetch it first in CI: "
                           "actions/checkout with fetch-depth: 0)")
    return proc.stdout


def changed_files(base: str, root: Path = PROJECT_ROOT) -> list[str]:
    """Paths changed since the merge base of `base` and HEAD, committed or not."""
    committed = _git(root, "diff", "--name-only", f"{base}...HEAD")
    uncommitted = _git(root, "diff", "--name-only", "HEAD")
    untracked = _git(root, "ls-files", "--others", "--exclude-standard")
    return sorted({p for text in (committed, uncommitted, untracked) for p in text.splitlines() if p})


def _pair_of_file(path: str, root: Path) -> str:
    """The name the pair in models/<stem>.py declares (the stem when the file is gone or broken)."""
    from harness.pairs import ModelPair, _load_file

    file = root / path
    if file.exists():
        try:
            pair = getattr(_load_file(file), "PAIR", None)
        except Exception:  # noqa: BLE001 - a broken file is still that pair's change
            pair = None
        if isinstance(pair, ModelPair):
            return pair.name
    return Path(path).stem


def _parse_toml(text: str | None, where: str) -> dict:
    if text is None:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"{where} is not valid TOML ({e}); fix the gates file") from None


def gates_changes(base: str, root: Path = PROJECT_ROOT) -> dict[str, str]:
    """Pairs whose gates moved between the merge base and the working tree ({ALL: ...} for the defaults):
    tables are compared parsed, so comments and layout move nothing."""
    merge_base = _git(root, "merge-base", base, "HEAD").strip()
    old = _parse_toml(_git(root, "show", f"{merge_base}:{GATES_FILE}", check=False), f"{GATES_FILE} at {base}")
    current = root / GATES_FILE
    new = _parse_toml(current.read_text() if current.exists() else None, GATES_FILE)
    changes = {}
    if old.get("defaults") != new.get("defaults"):
        changes[ALL] = f"the default gates ([defaults] of {GATES_FILE})"
    old_models, new_models = old.get("models", {}), new.get("models", {})
    for pair in sorted(set(old_models) | set(new_models)):
        if old_models.get(pair) != new_models.get(pair):
            changes[pair] = f"its gates ([models.{pair}] of {GATES_FILE})"
    return changes


def reasons_by_pair(files: list[str], gates: dict[str, str], root: Path = PROJECT_ROOT) -> dict[str, list[str]]:
    """Why each pair is touched, by pair name ({ALL: reasons} for changes that touch every pair)."""
    reasons: dict[str, list[str]] = {}
    code = [p for p in files if Path(p).parts[0] == "harness" and p != GATES_FILE]
    if code:
        shown = ", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "")
        reasons[ALL] = [f"harness code ({shown})"]

    def add(pair: str, reason: str) -> None:
        reasons.setdefault(pair, []).append(reason)

    for path in files:
        parts = Path(path).parts
        if path == GATES_FILE:
            for pair, reason in gates.items():
                add(pair, reason)
        elif parts[0] == "harness":
            continue  # said once above
        elif path in EVERY_PAIR_FILES:
            add(ALL, EVERY_PAIR_FILES[path])
        elif parts[0] == "models" and len(parts) == 2 and path.endswith(".py"):
            if parts[1].startswith("_"):
                add(ALL, f"a helper every pair file may import ({path})")
            else:
                add(_pair_of_file(path, root), f"its pair file ({path})")
        elif parts[0] == "golden" and len(parts) == 2 and path.endswith(".json"):
            add(Path(path).stem, f"its golden ({path})")
    return reasons


def touched(base: str, root: Path = PROJECT_ROOT) -> dict[str, list[str]]:
    """Why the change since `base` touches each pair, by name ({ALL: reasons} for what touches every pair)."""
    files = changed_files(base, root)
    gates = gates_changes(base, root) if GATES_FILE in files else {}
    return reasons_by_pair(files, gates, root)


def of_known(reasons: dict[str, list[str]], known: list[str]) -> dict[str, list[str]]:
    """The known pairs among `touched`'s reasons, each with its own reasons and those of every pair, in `known`'s order."""
    every = reasons.get(ALL, [])
    return {name: reasons.get(name, []) + every for name in known if reasons.get(name) or every}


def affected(base: str, known: list[str], root: Path = PROJECT_ROOT) -> dict[str, list[str]]:
    """The known pairs the change since `base` touches, each with its reasons, in `known`'s order."""
    return of_known(touched(base, root), known)


def suite_to_run(reasons: dict[str, list[str]], suites: dict[str, tuple[str, ...]]) -> str:
    """The suite a PR must verify: `full` when a pair that only the full suite holds (the real model) is touched
    by a change of its own (its file, golden or gates tables), else `default`. A change every pair shares
    (harness code, dependencies) leaves such a pair to the nightly full run, and the report says so."""
    own = [name for name in reasons if name != ALL and name in suites and DEFAULT_SUITE not in suites[name]]
    return FULL_SUITE if own else DEFAULT_SUITE


def outside_suite(touched_pairs: dict[str, list[str]], suite: str, suites: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """The touched pairs a run of `suite` does not verify, with why they are touched."""
    return {name: why for name, why in touched_pairs.items() if suite not in suites.get(name, (suite,))}


def verify_command(name: str) -> str:
    """The command that verifies a touched pair a run's suite left out (the console and the summary name it)."""
    return f"harness verify --suite {FULL_SUITE} --models {name}"


def plan(base: str, reasons: dict[str, list[str]], names: list[str], suites: dict[str, tuple[str, ...]]) -> dict:
    """What `harness affected --json` tells CI: the touched pairs with why, the suite that verifies them, and
    the touched pairs that suite leaves to the nightly full run."""
    pairs = of_known(reasons, names)
    suite = suite_to_run(reasons, suites)
    return {"base": base, "pairs": list(pairs), "reasons": pairs, "suite": suite,
            "left_to_nightly": list(outside_suite(pairs, suite, suites))}


def describe_skipped(base: str, skipped: list[str]) -> str:
    """The summary's line about the pairs a --changed-since run left out."""
    if not skipped:
        return f"Changed since {base}: every selected pair is touched; none skipped."
    return (f"Changed since {base}: skipped {len(skipped)} pair(s) the change does not touch "
            f"({', '.join(skipped)}).")
