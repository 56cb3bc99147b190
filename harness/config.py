"""One run configuration, built from the command line once, validated once, handed to children as JSON.

Each command lists the argument groups it takes (Polygraphy's tools do the same): a flag such as
`--models`, `--gates` or `--threads` is declared in one place and means the same in verify, golden
and bench. `RunConfig.from_cli` turns the parsed flags into the frozen configuration the library
runs; `validate` checks what no single flag can (lm-evaluation-harness's EvaluatorConfig is the model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from harness import stages
from harness.errors import HarnessError
from harness.pairs import DEFAULT_SUITE, SUITES


VERBOSE_ENV = "EDGE_PARITY_VERBOSE"  # set by `harness -v` for the whole run, children included


def default_cache_dir() -> str:
    """$EDGE_PARITY_CACHE, else ~/.cache/edge-parity: read when a configuration is made, not at import."""
    return os.environ.get("EDGE_PARITY_CACHE") or str(Path.home() / ".cache" / "edge-parity")


def _default_gates() -> str:
    return str(Path(__file__).with_name("gates.toml"))


def _default_golden_dir() -> str:
    return str(Path(__file__).resolve().parents[1] / "golden")


def _help(text: str) -> dict[str, Any]:
    return {"metadata": {"help": text}}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a run of model pairs; the same object, as JSON, configures each child process."""

    models: tuple[str, ...] | None = dataclasses.field(default=None, **_help("pair names; None: the suite"))
    suite: str = dataclasses.field(default=DEFAULT_SUITE, **_help("the suite run when no models are named"))
    models_dirs: tuple[str, ...] = dataclasses.field(default=(), **_help("extra folders of pair files"))
    gates: str = dataclasses.field(default_factory=_default_gates, **_help("the gates TOML file"))
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir, **_help("the shared artifact cache"))
    shared_cache: bool = dataclasses.field(default=True, **_help("False (--no-cache): build privately"))
    quant: tuple[str, ...] | None = dataclasses.field(default=None, **_help("recipes; None: each pair's default"))
    threads: tuple[int, ...] = dataclasses.field(default=(2,), **_help("interpreter threads"))
    stages: tuple[str, ...] | None = dataclasses.field(default=None, **_help("stages to run; None: all"))
    golden_dir: str = dataclasses.field(default_factory=_default_golden_dir, **_help("directory of goldens"))
    against: str | None = dataclasses.field(default=None, **_help("'golden': the release gate"))
    out: str | None = dataclasses.field(default=None, **_help("report directory"))
    isolate: bool = dataclasses.field(default=True, **_help("one child process per pair"))
    jobs: int | None = dataclasses.field(default=None, **_help("pairs run at once; None: suite.auto_jobs"))
    changed_since: str | None = dataclasses.field(default=None, **_help("git ref: only the pairs changed since"))
    shard: str | None = dataclasses.field(default=None, **_help("'I/N': this run's share of the pairs"))

    @property
    def num_threads(self) -> int:
        """The thread count of a parity run (bench measures every count in `threads`)."""
        return self.threads[0]

    def wants(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages

    def validate(self, command: str = "verify") -> RunConfig:
        """Checks across fields, before any work: a bad setting is a one-line error (exit 2), not a late crash."""
        if self.suite not in SUITES:
            raise HarnessError(f"unknown suite {self.suite!r}; choose {' or '.join(SUITES)}")
        if not self.threads or min(self.threads) < 1:
            raise HarnessError(f"--threads {','.join(map(str, self.threads))}: give positive integers, e.g. 1,2")
        if command != "bench" and len(self.threads) != 1:
            raise HarnessError(f"--threads takes one count for {command} (bench measures several)")
        unknown = [r for r in self.quant or () if r not in stages.QUANT_RECIPES]
        if unknown:
            raise HarnessError(f"unknown quant recipe(s) {', '.join(unknown)}; choose from "
                               f"{', '.join(stages.QUANT_RECIPES)}, 'all' or 'none'")
        known = stages.known_stages()
        unknown = [st for st in self.stages or () if st not in known]
        if unknown:
            raise HarnessError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
        if self.jobs is not None and self.jobs < 1:
            raise HarnessError(f"--jobs {self.jobs}: give a positive number of pairs to run at once")
        if self.jobs not in (None, 1) and not self.isolate:
            raise HarnessError(f"--jobs {self.jobs} runs pairs in child processes side by side; drop --in-process")
        if self.against not in (None, "golden"):
            raise HarnessError(f"--against {self.against!r}: the only reference is 'golden'")
        for directory in self.models_dirs:
            if not Path(directory).is_dir():
                raise HarnessError(f"models directory {directory} does not exist; pass a folder of pair files")
        if self.shard is not None:
            from harness.shards import parse_shard

            parse_shard(self.shard)
        if self.out is not None:
            check_writable(Path(self.out))
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        data = json.loads(text)
        for name in ("models", "models_dirs", "quant", "threads", "stages"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)

    @classmethod
    def from_cli(cls, args: argparse.Namespace, command: str) -> RunConfig:
        """The configuration of the flags a command's groups parsed (absent groups keep the defaults)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
        if getattr(args, "no_cache", False):
            given["shared_cache"] = False
        if getattr(args, "in_process", False):
            given["isolate"] = False
        return cls(**given).validate(command)


def check_writable(out: Path) -> None:
    """Tries a write where the reports will go (its nearest existing folder): permission bits do not tell
    (root passes them; a read-only file system or /sys does not)."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise HarnessError(f"--out {out} is a file; pass a directory for the reports")
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HarnessError(f"--out {out}: {probe} is a file, not a folder; pass a directory for the reports")
    try:
        fd, name = tempfile.mkstemp(prefix=".edge-parity-write-probe-", dir=probe)
    except OSError as e:
        raise HarnessError(f"--out {out}: cannot write in {probe} ({e.strerror}); pass a directory you can "
                           "write to") from None
    os.close(fd)
    os.unlink(name)


# ---------------------------------------------------------------- argument groups

def _names(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.replace(" ", "").split(",") if v)


def _quant(value: str) -> tuple[str, ...] | None:
    """'default', 'all', 'none', or a comma list of recipes (checked by RunConfig.validate)."""
    if value == "default":
        return None
    if value == "all":
        return stages.QUANT_RECIPES
    if value == "none":
        return ()
    return _names(value)


def _threads(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _names(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads {value!r}: give a comma list of positive integers") from None


def models_group(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=_names, default=None, help="comma list of pair names (default: the suite's pairs)")
    parser.add_argument("--suite", default=None, choices=list(SUITES), help="the suite run when no --models (default: default)")
    parser.add_argument("--models-dir", dest="models_dirs", action="append", type=str, default=None,
                        help="extra folder of pair files, besides models/ (repeatable)")


def gates_group(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gates", default=None, help="gates TOML file (default: harness/gates.toml)")


def cache_group(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None, help="artifact cache directory (default: $EDGE_PARITY_CACHE, else ~/.cache/edge-parity)")
    parser.add_argument("--no-cache", action="store_true", help="build everything afresh, privately")


def quant_group(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant", type=_quant, default=None, help="quant recipes: 'default' (each pair's own), 'all', 'none' or a comma list")


def threads_group(parser: argparse.ArgumentParser, default: str = "2") -> None:
    parser.add_argument("--threads", type=_threads, default=_threads(default),
                        help=f"interpreter threads, a comma list (default {default})")


def stages_group(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", type=_names, default=None,
                        help="comma list of stages to run (default: all, but for those a pair runs only when named, its "
                             "opt_in_stages, each reported as a skip with the reason; hf and reauthored always run)")


def golden_group(parser: argparse.ArgumentParser, release: bool = True) -> None:
    parser.add_argument("--golden-dir", default=None, help="directory of golden files (default: golden/)")
    if release:
        parser.add_argument("--against", choices=["golden"], default=None,
                            help="release gate: every stage must have a golden and stay within its budget")


def output_group(parser: argparse.ArgumentParser, default: str | None = "reports/latest") -> None:
    parser.add_argument("--out", default=default, help=f"report directory (default {default})")


def isolation_group(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in-process", action="store_true", help="run pairs in this process, not one child each (for debugging; a crash then stops the run)")
    parser.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                        help="pairs run at once, each in its own process (default: one per core, at most 2, for "
                             "tiny pairs; 1 when a real model is selected)")


def selection_group(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--changed-since", default=None, metavar="REF",
                        help="run only the pairs the change since git REF touches (see `harness affected`)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run shard I of N: a deterministic share of the pairs, balanced by measured cost")
