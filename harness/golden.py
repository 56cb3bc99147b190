"""Golden outputs: what every stage of a pair produced at the last release, to say what moved since.

Parity against HF says a conversion is right today; a golden says what changed since it was
recorded (a new litert-torch, transformers, TensorFlow or model definition). One JSON file per
pair in golden/, written by `harness golden update` only. Storage (`load`, `save`) is separate
from serialisation (`dumps`, `parse`) and from the plain functions that record, compare and diff.

Without `--against golden` the golden check runs whenever a pair has a golden file and is
`skip` (naming the command that records one) when it has none; with `--against golden`
(the release gate) a missing golden is an `error`, since a release cannot be judged against
nothing. A corrupt, unknown-schema or other-definition golden is always an `error`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from harness import stages
from harness.checks import verdict
from harness.errors import GoldenError
from harness.gates import Gates, gate_for
from harness.pairs import ModelPair, describe, fingerprint
from harness.paths import display_path
from harness.records import ERROR, FAIL, PASS, SKIP, XFAIL, CheckResult, isa_features, library_versions
from harness import report
from harness.report import write_atomic, write_report
from harness.workload import greedy_of

SCHEMA_VERSION = 1
GOLDEN = stages.GOLDEN
DEFAULT_GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
TOP_K = 5
DECIMALS = 4  # logits and statistics are stored rounded to this many decimal places
RELEASE_MD = "release.md"
STATS = ("mean", "std", "min", "max")
FIXED_KEYS = ("top_k", "stats")  # floats under them are rounded to `decimals` and written with that many places
NOT_IN_CHAIN = ("hypothesis",)  # tracked by records.library_versions, but shapes no output
# The fields that fix a pair's prompts and reference weights: if they differ, nothing is comparable.
REFERENCE_FIELDS = ("name", "hf_class", "hf_config", "workload", "seed", "init_std", "checkpoint_builder")


class MissingGolden(GoldenError):
    pass


def update_command(model: str) -> str:
    return f"harness golden update --models {model}"


def golden_path(golden_dir: Path, model: str) -> Path:
    return Path(golden_dir) / f"{model}.json"


def reference_key(pair: ModelPair) -> str:
    """Hash of what decides the prompts and the reference weights (the builders are left out)."""
    text = json.dumps({f: describe(getattr(pair, f)) for f in REFERENCE_FIELDS}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def chain_versions(versions: dict[str, str] | None = None) -> dict[str, str]:
    """The versions of the libraries that shape the outputs, sorted."""
    versions = versions if versions is not None else library_versions()
    return {k: v for k, v in sorted(versions.items()) if k not in NOT_IN_CHAIN}


def _round(x: float, decimals: int) -> float:
    return round(float(x), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


def stage_names(logits: dict[str, Any]) -> list[str]:
    """The stages that produced logits, in pipeline order."""
    quant = [stages.tflite_stage(r) for r in stages.QUANT_RECIPES]
    return [s for s in (*stages.FLOAT_STAGES, *quant) if s in logits]


# ---------------------------------------------------------------- recording

def record_stage(logits: list[np.ndarray], trajectories, top_k: int = TOP_K, decimals: int = DECIMALS) -> dict:
    """Top-k ids and logits at every position, greedy ids and statistics, per prompt."""
    rows, greedy, stats = [], [], []
    for lg, traj in zip(logits, trajectories, strict=True):
        order = np.argsort(-lg, axis=-1, kind="stable")[:, :top_k]
        rows.append([{"ids": [int(i) for i in ids], "logits": [_round(v, decimals) for v in lg[p, ids]]}
                     for p, ids in enumerate(order)])
        greedy.append([int(t) for t in greedy_of(lg, traj)])
        lg64 = lg.astype(np.float64)
        stats.append({"mean": _round(lg64.mean(), decimals), "std": _round(lg64.std(), decimals),
                      "min": _round(lg64.min(), decimals), "max": _round(lg64.max(), decimals)})
    return {"greedy": greedy, "stats": stats, "top_k": rows}


def parity_of(results: list[CheckResult], stage: str) -> tuple[str, list[str]]:
    """A stage's parity verdict from its checks (golden excluded), and the failing checks' messages."""
    mine = [r for r in results if r.stage == stage and r.check != GOLDEN]
    bad = [f"{r.check}: {r.message}" for r in mine if r.status in (FAIL, ERROR)]
    if bad:
        return FAIL, bad
    if any(r.status == XFAIL for r in mine):
        return XFAIL, [f"{r.check}: {r.message}" for r in mine if r.status == XFAIL]
    return PASS, []


def record(pair: ModelPair, logits: dict[str, list[np.ndarray]], trajectories, results: list[CheckResult],
           gates: Gates, *, recorded: str, versions: dict[str, str] | None = None, forced: str | None = None,
           isa: list[str] | None = None) -> dict:
    """A golden document from one run's logits per stage; key order is fixed here, so output is reproducible."""
    entries = {}
    for stage in stage_names(logits):
        status, _ = parity_of(results, stage)
        gates_in_force = gates.stage_table(pair.name, stage)
        entries[stage] = {"parity": status, "gates": gates_in_force, **record_stage(logits[stage], trajectories)}
    failing = {s: parity_of(results, s)[1] for s in _failing_stages(results)}
    provenance = {
        "recorded": recorded,
        "pair_fingerprint": fingerprint(pair),
        "reference_key": reference_key(pair),
        "python": platform.python_version(),
        "versions": chain_versions(versions),
        # XNNPack picks its kernels by instruction set; a quantized stage's last rounding steps follow them.
        "host": {"machine": platform.machine(), "isa": isa_features() if isa is None else list(isa)},
    }
    if forced:
        provenance["forced"] = {"reason": forced, "failing": failing}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": pair.name,
        "provenance": provenance,
        "format": {"top_k": TOP_K, "decimals": DECIMALS},
        "prompts": [{"prompt_len": int(t.prompt_len), "tokens": [int(x) for x in t.tokens]} for t in trajectories],
        "stages": entries,
    }


def _failing_stages(results: list[CheckResult]) -> list[str]:
    seen = []
    for r in results:
        if r.check != GOLDEN and r.stage != GOLDEN and r.status in (FAIL, ERROR, XFAIL) and r.stage not in seen:
            seen.append(r.stage)
    return seen


# ---------------------------------------------------------------- serialisation

def dumps(document: dict) -> str:
    """Indented JSON whose innermost containers sit on one line (one position per line, so diffs read
    well); stored logits and statistics are written with exactly `format.decimals` places."""
    decimals = document.get("format", {}).get("decimals", DECIMALS)

    def inline(value) -> bool:
        if isinstance(value, dict):
            return all(not isinstance(v, (dict, list)) or (isinstance(v, list) and inline(v)) for v in value.values())
        return all(not isinstance(v, (dict, list)) for v in value)

    def scalar(value, fixed: bool) -> str:
        if fixed and isinstance(value, float):
            return f"{value:.{decimals}f}"
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v, fixed) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)}: {scalar(v, fixed or k in FIXED_KEYS)}"
                                   for k, v in value.items()) + "}"
        return json.dumps(value, ensure_ascii=False, allow_nan=False)

    def enc(value, depth: int, fixed: bool) -> str:
        if isinstance(value, (dict, list)) and value and not inline(value):
            pad, inner = " " * depth, " " * (depth + 1)
            if isinstance(value, dict):
                items = [f"{inner}{json.dumps(k)}: {enc(v, depth + 1, fixed or k in FIXED_KEYS)}"
                         for k, v in value.items()]
                return "{\n" + ",\n".join(items) + f"\n{pad}}}"
            return "[\n" + ",\n".join(f"{inner}{enc(v, depth + 1, fixed)}" for v in value) + f"\n{pad}]"
        return scalar(value, fixed)

    return enc(document, 0, False) + "\n"


def parse(text: str, where: str, model: str) -> dict:
    """A golden document from its text, validated, or a GoldenError naming the file and the fix."""
    fix = f"regenerate it with `{update_command(model)}`"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise GoldenError(f"golden file {where} is corrupt (not valid JSON: {e}); {fix}") from None
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise GoldenError(f"golden file {where} is corrupt (no schema_version); {fix}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise GoldenError(f"golden file {where} has schema version {doc['schema_version']!r}, but this harness "
                          f"reads version {SCHEMA_VERSION}; {fix}")
    problem = _shape_problem(doc)
    if problem:
        raise GoldenError(f"golden file {where} is corrupt ({problem}); {fix}")
    return doc


def _shape_problem(doc: dict) -> str | None:
    """The first structural defect of a document, in words; None when it is well formed."""
    for key, kind in (("model", str), ("provenance", dict), ("format", dict), ("prompts", list), ("stages", dict)):
        if not isinstance(doc.get(key), kind):
            return f"'{key}' is missing or not a {kind.__name__}"
    if not isinstance(doc["provenance"].get("reference_key"), str):
        return "provenance.reference_key is missing"
    if not all(isinstance(doc["format"].get(k), int) for k in ("top_k", "decimals")):
        return "format.top_k or format.decimals is missing"
    lengths = []
    for i, p in enumerate(doc["prompts"]):
        if not (isinstance(p, dict) and isinstance(p.get("tokens"), list) and isinstance(p.get("prompt_len"), int)):
            return f"prompts[{i}] lacks tokens or prompt_len"
        lengths.append(len(p["tokens"]) - 1)
    for stage, entry in doc["stages"].items():
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), list) for k in ("greedy", "stats", "top_k")):
            return f"stages.{stage} lacks greedy, stats or top_k"
        if [len(rows) for rows in entry["top_k"]] != lengths or len(entry["stats"]) != len(lengths):
            return f"stages.{stage} has {[len(r) for r in entry['top_k']]} positions per prompt, the prompts {lengths}"
        for i, rows in enumerate(entry["top_k"]):
            for p, row in enumerate(rows):
                ok = (isinstance(row, dict) and isinstance(row.get("ids"), list) and isinstance(row.get("logits"), list)
                      and len(row["ids"]) == len(row["logits"]) > 0
                      and all(isinstance(v, (int, float)) for v in row["ids"] + row["logits"]))
                if not ok:
                    return f"stages.{stage}.top_k[{i}][{p}] is not ids and logits of equal length"
        for i, s in enumerate(entry["stats"]):
            if not (isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) for k in STATS)):
                return f"stages.{stage}.stats[{i}] lacks {', '.join(STATS)}"
    return None


# ---------------------------------------------------------------- storage

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


def save(golden_dir: Path, document: dict) -> Path:
    path = golden_path(golden_dir, document["model"])
    write_atomic(path, dumps(document))
    path.chmod(0o644)  # a temp file's 0600 would outlive the rename
    return path


def stale_files(golden_dir: Path, known: set[str]) -> list[Path]:
    """Golden files that match no model pair any more."""
    return [p for p in sorted(Path(golden_dir).glob("*.json")) if p.stem not in known]


# ---------------------------------------------------------------- comparing

def provenance_changes(golden: dict, pair: ModelPair, versions: dict[str, str] | None = None,
                       isa: list[str] | None = None) -> list[str]:
    """Which libraries, host instruction sets (and whether the pair definition) differ from the golden's provenance."""
    now = {**chain_versions(versions), "python": platform.python_version()}
    then = {**golden["provenance"].get("versions", {}), "python": golden["provenance"].get("python")}
    changes = [f"{k} {then.get(k) or 'absent'} (golden) -> {now.get(k) or 'absent'} (now)"
               for k in sorted(set(now) | set(then)) if then.get(k) != now.get(k)]
    recorded_isa = golden["provenance"].get("host", {}).get("isa")
    isa = isa_features() if isa is None else list(isa)
    if recorded_isa is None:
        changes.append("the golden does not say which instruction sets it was recorded on")
    elif set(recorded_isa) != set(isa):
        only_then, only_now = sorted(set(recorded_isa) - set(isa)), sorted(set(isa) - set(recorded_isa))
        changes.append("another CPU: recorded with " + (", ".join(only_then) or "no extra ISA") + ", running with "
                       + (", ".join(only_now) or "no extra ISA")
                       + " (XNNPack picks kernels by ISA; quantized stages may round differently)")
    if golden["provenance"].get("pair_fingerprint") != fingerprint(pair):
        changes.append("pair definition changed (builders, export settings or recipes)")
    return changes


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _restricted_kl(golden_logits: np.ndarray, logits: np.ndarray) -> float:
    """KL(golden || now) of the softmax over the golden's top-k ids: how far the distribution of the tokens
    that mattered moved, blind to a shift of every logit by the same amount."""
    log_p = golden_logits - golden_logits.max()
    log_p -= np.log(np.exp(log_p).sum())
    log_q = logits - logits.max()
    log_q -= np.log(np.exp(log_q).sum())
    return float((np.exp(log_p) * (log_p - log_q)).sum())


def stage_drift(entry: dict, logits: list[np.ndarray], golden: dict, trajectories) -> dict[str, Any]:
    """How far a stage's logits are from its golden, and where: positions with the golden's context only."""
    worst, top1_changes, greedy_diffs, diverged = None, [], [], []
    compared = agree = greedy_total = greedy_same = 0
    stats_err, kls, overlaps = 0.0, [], []
    for i, (lg, traj, prompt) in enumerate(zip(logits, trajectories, golden["prompts"], strict=True)):
        tokens = [int(t) for t in traj.tokens]
        same = _common_prefix(tokens, prompt["tokens"])
        if same < len(tokens):
            diverged.append(f"prompt {i} from token {same}")
        usable = min(same, len(tokens) - 1, len(entry["top_k"][i]))  # position p sees tokens[0..p]
        for p in range(usable):
            row = entry["top_k"][i][p]
            got = lg[p, row["ids"]].astype(np.float64)
            want = np.asarray(row["logits"], dtype=np.float64)
            err = np.abs(got - want)
            k = int(err.argmax())
            if worst is None or err[k] > worst[0]:
                worst = (float(err[k]), i, p, row["ids"][k], float(got[k]), row["logits"][k])
            kls.append(_restricted_kl(want, got))
            top = np.argpartition(-lg[p], len(row["ids"]) - 1)[:len(row["ids"])]
            overlaps.append(len(set(top.tolist()) & set(row["ids"])) / len(row["ids"]))
            compared += 1
            top = int(lg[p].argmax())
            agree += top == row["ids"][0]
            if top != row["ids"][0]:
                top1_changes.append((i, p, top, row["ids"][0]))
        start = prompt["prompt_len"] - 1
        ours = [int(t) for t in greedy_of(lg, traj)]
        for j, (a, b) in enumerate(zip(ours, entry["greedy"][i])):
            if start + j < usable:
                greedy_total += 1
                greedy_same += a == b
                if a != b:
                    greedy_diffs.append((i, j, a, b))
        if same == len(tokens):
            lg64 = lg.astype(np.float64)
            now = {"mean": lg64.mean(), "std": lg64.std(), "min": lg64.min(), "max": lg64.max()}
            stats_err = max([stats_err] + [abs(now[k] - entry["stats"][i][k]) for k in STATS])
    return {"max_abs_err": worst[0] if worst else 0.0, "top1": agree / max(compared, 1),
            "greedy_match": greedy_same / max(greedy_total, 1), "max_stats_err": float(stats_err),
            "mean_kl": float(np.mean(kls)) if kls else 0.0, "max_kl": float(np.max(kls)) if kls else 0.0,
            "top5_overlap": float(np.mean(overlaps)) if overlaps else 1.0,
            "positions": compared, "worst": worst, "top1_changes": top1_changes,
            "greedy_diffs": greedy_diffs, "diverged": diverged}


def _where(drift: dict) -> list[str]:
    parts = []
    if drift["worst"]:
        err, i, p, tok, got, want = drift["worst"]
        parts.append(f"worst at prompt {i} position {p} token {tok}: logit {got:.4f}, golden {want:.4f} "
                     f"(|diff| {err:.3g})")
    if drift["top1_changes"]:
        i, p, now, then = drift["top1_changes"][0]
        parts.append(f"top-1 token changed at {len(drift['top1_changes'])} of {drift['positions']} positions, "
                     f"first at prompt {i} position {p}: {now} instead of {then}")
    if drift["greedy_diffs"]:
        i, j, now, then = drift["greedy_diffs"][0]
        parts.append(f"greedy output differs first at prompt {i} generated token {j}: {now} instead of {then}")
    if drift["diverged"]:
        parts.append("the HF trajectory left the golden's (" + ", ".join(drift["diverged"])
                     + "): later positions not compared")
    return parts


def _check_prompts(golden: dict, path: Path, model: str, trajectories) -> None:
    """The run's prompts must be the golden's (its continuations may differ: that is drift)."""
    now = [[int(x) for x in t.tokens[:t.prompt_len]] for t in trajectories]
    then = [p["tokens"][:p["prompt_len"]] for p in golden["prompts"]]
    if now != then:
        which = next((i for i, (a, b) in enumerate(zip(now, then)) if a != b), min(len(now), len(then)))
        raise GoldenError(f"golden file {display_path(path)} was recorded on other prompts ({len(then)} prompts, this run "
                          f"{len(now)}; prompt {which} differs): the workload changed; regenerate it with "
                          f"`{update_command(model)}`")


def compare(golden: dict, path: Path, pair: ModelPair, logits: dict[str, list[np.ndarray]], trajectories,
            gates: Gates, versions: dict[str, str] | None = None, strict: bool = False,
            isa: list[str] | None = None) -> list[CheckResult]:
    """One `golden` result per stage that ran: drift from the golden held to [*.<stage>.golden] gates."""
    _check_prompts(golden, path, pair.name, trajectories)
    changes = provenance_changes(golden, pair, versions, isa)
    recorded = f"{display_path(path)} (recorded {golden['provenance'].get('recorded', '?')})"
    half = 0.5 * 10 ** -golden["format"]["decimals"]
    results = []
    for stage in stage_names(logits):
        entry = golden["stages"].get(stage)
        if entry is None:
            command = update_command(pair.name)
            if stages.is_quantized(stage):
                command += f" --quant {stages.recipe_of(stage)}"
            results.append(CheckResult(pair.name, stage, GOLDEN, ERROR if strict else SKIP,
                                       message=f"{display_path(path)} has no golden for stage {stage}; "
                                               f"record it with `{command}`"))
            continue
        drift = stage_drift(entry, logits[stage], golden, trajectories)
        metrics = {k: drift[k] for k in ("max_abs_err", "mean_kl", "max_kl", "top5_overlap", "top1", "greedy_match",
                                         "max_stats_err", "positions")}
        metrics["changed"] = bool(drift["max_abs_err"] > 2 * half or drift["max_stats_err"] > 2 * half
                                  or drift["top1"] < 1 or drift["greedy_match"] < 1 or drift["diverged"])
        metrics["provenance_changes"] = changes
        context = (_where(drift) if metrics["changed"] else []) + [f"vs {recorded}"] + (
            [f"differs from its provenance: {'; '.join(changes)}"] if changes else [])
        results.append(verdict(pair.name, stage, GOLDEN, metrics, gate_for(gates, pair, stage, GOLDEN),
                               "; ".join(context), detail_on_pass=metrics["changed"] or bool(changes)))
    return results


@dataclasses.dataclass
class GoldenCheck:
    """The `golden` extra check: one result per stage that produced logits."""

    golden_dir: Path = DEFAULT_GOLDEN_DIR
    strict: bool = False  # --against golden: a missing golden is an error, not a skip
    name = GOLDEN

    def __call__(self, state) -> list[CheckResult]:
        return self.check(state.pair, state.logits, state.trajectories, state.options.gates)

    def check(self, pair: ModelPair, logits: dict[str, list[np.ndarray]], trajectories, gates: Gates) -> list[CheckResult]:
        """The pair's logits per stage against its golden; a missing or broken golden is one record saying so."""
        try:
            doc = load(self.golden_dir, pair)
        except MissingGolden as e:
            return [CheckResult(pair.name, GOLDEN, GOLDEN, ERROR if self.strict else SKIP, message=str(e))]
        except GoldenError as e:
            return [CheckResult(pair.name, GOLDEN, GOLDEN, ERROR, message=str(e))]
        try:
            return compare(doc, golden_path(self.golden_dir, pair.name), pair, logits, trajectories, gates,
                           strict=self.strict)
        except GoldenError as e:
            return [CheckResult(pair.name, GOLDEN, GOLDEN, ERROR, message=str(e))]


# ---------------------------------------------------------------- updating and diffs

def _flat_versions(doc: dict) -> dict[str, str]:
    return {**doc["provenance"].get("versions", {}), "python": doc["provenance"].get("python")}


def render_diff(old: dict | None, new: dict, path: Path) -> str:
    """What moved between two goldens of a pair, one line per fact; 'unchanged' when nothing did."""
    if old is None:
        return f"{display_path(path)}: new golden, stages {', '.join(new['stages'])}"
    lines = []
    a, b = _flat_versions(old), _flat_versions(new)
    lines += [f"  version {k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    was_isa, now_isa = old["provenance"].get("host", {}).get("isa"), new["provenance"]["host"]["isa"]
    if was_isa != now_isa:
        lines.append(f"  recording host's instruction sets: {', '.join(was_isa) if was_isa else 'not recorded'} -> "
                     f"{', '.join(now_isa)}")
    if old["provenance"].get("pair_fingerprint") != new["provenance"]["pair_fingerprint"]:
        was, now = str(old["provenance"].get("pair_fingerprint"))[:12], new["provenance"]["pair_fingerprint"][:12]
        lines.append(f"  pair definition changed (fingerprint {was} -> {now})")
    was, now = old["provenance"].get("forced") or {}, new["provenance"].get("forced") or {}
    if was.get("reason") != now.get("reason"):
        lines.append(f"  forced reason: {was.get('reason')!r} -> {now.get('reason')!r}")
    if list(was.get("failing", {})) != list(now.get("failing", {})):
        lines.append(f"  stages failing parity: {list(was.get('failing', {}))} -> {list(now.get('failing', {}))}")
    elif was.get("failing") != now.get("failing"):
        lines.append("  parity failure messages changed: " + "; ".join(
            f"{st}: {' / '.join(m)[:160]}" for st, m in now["failing"].items() if was["failing"].get(st) != m))
    if old["prompts"] != new["prompts"]:
        lines.append("  HF trajectories changed: " + ", ".join(
            f"prompt {i} from token {_common_prefix(o['tokens'], n['tokens'])}"
            for i, (o, n) in enumerate(zip(old["prompts"], new["prompts"])) if o != n))
    for stage in new["stages"]:
        if stage not in old["stages"]:
            lines.append(f"  {stage}: added")
    for stage in old["stages"]:
        if stage not in new["stages"]:
            lines.append(f"  {stage}: removed (did not produce outputs in this run)")
    for stage, entry in new["stages"].items():
        if stage in old["stages"]:
            lines += [f"  {stage}: {line}" for line in _stage_diff(old["stages"][stage], entry)]
    return f"{display_path(path)}: " + ("unchanged" if not lines else "changed\n" + "\n".join(lines))


def _flat_gates(gates: dict) -> dict[str, Any]:
    return {f"{check}.{key}": value for check, table in gates.items() for key, value in table.items()}


def _stage_diff(old: dict, new: dict) -> list[str]:
    lines = []
    if old.get("parity") != new.get("parity"):
        lines.append(f"parity {old.get('parity')} -> {new.get('parity')}")
    was, now = _flat_gates(old.get("gates", {})), _flat_gates(new.get("gates", {}))
    lines += [f"gate {k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    for i, (o, n) in enumerate(zip(old["greedy"], new["greedy"])):
        if o != n:
            lines.append(f"prompt {i} greedy {o} -> {n}")
    worst, top1 = (0.0, None), 0
    for i, (orows, nrows) in enumerate(zip(old["top_k"], new["top_k"])):
        for p, (o, n) in enumerate(zip(orows, nrows)):
            top1 += o["ids"][0] != n["ids"][0]
            before = dict(zip(o["ids"], o["logits"]))
            for tok, value in zip(n["ids"], n["logits"]):
                if tok in before and abs(value - before[tok]) > worst[0]:
                    worst = (abs(value - before[tok]), f"prompt {i} position {p} token {tok}: {before[tok]} -> {value}")
    if top1:
        lines.append(f"top-1 token changed at {top1} positions")
    if worst[1]:
        lines.append(f"top-k logits moved by up to {worst[0]:.4g} ({worst[1]})")
    elif any(o["ids"] != n["ids"] for orows, nrows in zip(old["top_k"], new["top_k"]) for o, n in zip(orows, nrows)):
        lines.append("top-k ids changed")
    for i, (o, n) in enumerate(zip(old["stats"], new["stats"])):
        if o != n:
            lines.append(f"prompt {i} stats " + ", ".join(f"{k} {o[k]} -> {n[k]}" for k in STATS if o[k] != n[k]))
    return lines


def recipes_to_record(pair: ModelPair, golden_dir: Path, extra: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The pair's default recipes, those its golden already holds, and any asked for: an update never
    drops a recipe just because this run did not name it."""
    wanted = set(pair.default_quant) | set(extra or ())
    path = golden_path(golden_dir, pair.name)
    try:
        held = parse(path.read_text(), display_path(path), pair.name)["stages"] if path.exists() else {}
    except GoldenError:
        held = {}
    wanted |= {stages.recipe_of(s) for s in held if stages.is_quantized(s)}
    return tuple(r for r in stages.QUANT_RECIPES if r in wanted and r in pair.quant_recipes)


def _without_date(doc: dict) -> str:
    return dumps({**doc, "provenance": {**doc["provenance"], "recorded": None}})


@dataclasses.dataclass
class UpdateOutcome:
    model: str
    path: Path
    status: str  # "recorded", "unchanged" or "refused"
    diff: str
    refused: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # stage -> failing checks


def update(pair: ModelPair, logits: dict[str, list[np.ndarray]], trajectories, results: list[CheckResult],
           gates: Gates, golden_dir: Path,
           force_reason: str | None = None, today: str | None = None,
           versions: dict[str, str] | None = None) -> UpdateOutcome:
    """Re-records a pair's golden unless a stage fails parity (and no reason forces it); keeps the
    recorded date when nothing else changed, so re-recording is byte-for-byte reproducible."""
    path = golden_path(golden_dir, pair.name)
    failing = {}
    for stage in _failing_stages(results):
        status, messages = parity_of(results, stage)
        if status == FAIL:
            failing[stage] = messages
    detail = "; ".join(f"{s}: {' / '.join(m)[:300]}" for s, m in failing.items())
    if not trajectories:
        return UpdateOutcome(pair.name, path, "refused", f"{display_path(path)}: refused, the HF reference produced no "
                             f"outputs, so there is nothing to record ({detail})", failing)
    if failing and not force_reason:
        return UpdateOutcome(pair.name, path, "refused",
                             f"{display_path(path)}: refused, stages fail parity ({detail}); fix them, or record anyway with "
                             f"`harness golden update --models {pair.name} --force --reason \"why\"`", failing)
    today = today or datetime.date.today().isoformat()
    new = record(pair, logits, trajectories, results, gates, recorded=today, versions=versions, forced=force_reason)
    try:
        old = parse(path.read_text(), display_path(path), pair.name) if path.exists() else None
    except GoldenError:
        old = None
    if old is not None and _without_date(old) == _without_date(new):
        new["provenance"]["recorded"] = old["provenance"]["recorded"]
    diff = render_diff(old, new, path)
    text = dumps(new)
    if path.exists() and path.read_text() == text:
        return UpdateOutcome(pair.name, path, "unchanged", diff)
    if old is None and path.exists():
        diff = f"{display_path(path)}: replaced an unreadable golden; stages {', '.join(new['stages'])}"
    save(golden_dir, new)
    return UpdateOutcome(pair.name, path, "recorded", diff)


# ---------------------------------------------------------------- release gate

def release_summary(document: dict) -> dict:
    """Which models and stages moved since their goldens, and whether within budget: from records only."""
    rows, changes, parity_failures = [], set(), []
    for r in document["results"]:
        if r["check"] == GOLDEN:
            m = r["metrics"]
            changes.update(m.get("provenance_changes", []))
            within = r["status"] in (PASS, XFAIL)
            rows.append({"model": r["model"], "stage": r["stage"], "status": r["status"],
                         "changed": m.get("changed"), "within_budget": within,
                         **{k: m[k] for k in ("max_abs_err", "top1", "greedy_match") if k in m},
                         "threshold": r["threshold"], "message": r["message"]})
        elif r["status"] in (FAIL, ERROR):
            parity_failures.append({"model": r["model"], "stage": r["stage"], "check": r["check"],
                                    "message": r["message"]})
    ready = bool(rows) and all(row["within_budget"] for row in rows) and not parity_failures
    models = {}
    for row in rows:
        model = models.setdefault(row["model"], {"changed_stages": [], "within_budget": True, "parity_failures": 0})
        model["changed_stages"] += [row["stage"]] if row["changed"] else []
        model["within_budget"] &= row["within_budget"]
    for failure in parity_failures:
        models.setdefault(failure["model"], {"changed_stages": [], "within_budget": True, "parity_failures": 0})
        models[failure["model"]]["parity_failures"] += 1
    return {"ready": ready, "versions_changed": sorted(changes),
            "changed": [f"{row['model']}/{row['stage']}" for row in rows if row["changed"]],
            "models": models, "stages": rows, "parity_failures": parity_failures}


def render_release(summary: dict) -> str:
    """release.md, rendered from the `release` section of parity.json."""
    def num(row, key):
        if key not in row:
            return ""
        limit = row["threshold"].get(f"max_{key}", row["threshold"].get(f"min_{key}"))
        return f"{row[key]:.3g}" + (f" ({'≤' if f'max_{key}' in row['threshold'] else '≥'}{limit:.3g})"
                                    if limit is not None else "")

    lines = [f"# Release readiness: {'READY' if summary['ready'] else 'NOT READY'}", ""]
    lines += ["Differences from the goldens' provenance:", ""]
    lines += [f"- {c}" for c in summary["versions_changed"]] or ["- none"]
    lines += ["", f"Moved since the golden: {', '.join(summary['changed']) or 'nothing'}.", ""]
    lines += [f"- {name}: {'within budget' if m['within_budget'] else 'OVER BUDGET'}"
              + (f", changed: {', '.join(m['changed_stages'])}" if m["changed_stages"] else ", unchanged")
              + (f", {m['parity_failures']} parity failure(s)" if m["parity_failures"] else "")
              for name, m in summary.get("models", {}).items()] + [""]
    table = [[r["model"], r["stage"], r["status"] if r["status"] == PASS else r["status"].upper(),
              {True: "yes", False: "no", None: ""}[r["changed"]], "yes" if r["within_budget"] else "NO",
              num(r, "max_abs_err"), num(r, "top1"), num(r, "greedy_match"), r["message"][:200]]
             for r in summary["stages"]]
    lines += [tabulate(table, headers=["model", "stage", "golden", "changed", "within budget", "max_abs_err", "top1",
                                       "greedy_match", "detail"], tablefmt="github"), ""]
    if summary["parity_failures"]:
        lines += ["Parity failures (against HF, independent of the goldens):", ""]
        lines += [f"- {f['model']} {f['stage']} {f['check']}: {f['message'][:200]}" for f in summary["parity_failures"]]
    return "\n".join(lines).rstrip() + "\n"


def write_release(out_dir: Path, document: dict) -> Path:
    """Adds the `release` section to parity.json and renders release.md beside it."""
    document["release"] = release_summary(document)
    report.write_parity(out_dir, document)
    path = Path(out_dir) / RELEASE_MD
    write_report(path, render_release(document["release"]))
    return path
