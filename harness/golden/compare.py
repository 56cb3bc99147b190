"""The `golden` check: how far each stage's logits moved from its golden, judged by the golden gates.

The comparator of the four parts: it reads a document through store and measures drift only at
positions whose context the golden saw, so a changed HF trajectory is reported, not mis-measured.

Without `--against golden` the check runs whenever a pair has a golden file and is `skip` (naming
the command that records one) when it has none; with `--against golden` (the release gate) a missing
golden is an `error`, since a release cannot be judged against nothing. A corrupt, unknown-schema or
other-definition golden is always an `error`.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import numpy as np

from harness import stages
from harness.checks import judged
from harness.errors import GoldenError
from harness.gates import Gates, gate_for
from harness.golden.serialise import GOLDEN, STATS, chain_versions, stage_names, update_command
from harness.golden.store import DEFAULT_GOLDEN_DIR, MissingGolden, golden_path, load
from harness.pairs import ModelPair, fingerprint
from harness.paths import display_path
from harness.records import ERROR, SKIP, CheckResult, isa_features
from harness.workload import Trajectory, greedy_of


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


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two trajectories share: where one left the other."""
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


@dataclasses.dataclass(frozen=True)
class RunOutput:
    """One prompt's logits from this run, as the comparator reads a stage's output."""

    logits: np.ndarray  # [positions, vocab]
    trajectory: Trajectory

    @property
    def tokens(self) -> list[int]:
        return [int(t) for t in self.trajectory.tokens]

    def values(self, p: int, ids: list[int]) -> np.ndarray:
        return self.logits[p, ids].astype(np.float64)

    def top(self, p: int, k: int) -> set[int]:
        return set(np.argpartition(-self.logits[p], k - 1)[:k].tolist())

    def argmax(self, p: int) -> int:
        return int(self.logits[p].argmax())

    def greedy(self) -> list[int]:
        return [int(t) for t in greedy_of(self.logits, self.trajectory)]

    def stats(self) -> dict[str, float]:
        lg64 = self.logits.astype(np.float64)
        return {"mean": lg64.mean(), "std": lg64.std(), "min": lg64.min(), "max": lg64.max()}


@dataclasses.dataclass(frozen=True)
class RecordedOutput:
    """One prompt of a stage as another golden recorded it (another host's, say): its top-k, greedy ids and
    statistics, so two recordings are compared by the same measures as a run and its golden."""

    entry: dict  # the other document's stage entry
    prompt: dict  # the other document's prompt
    index: int

    @property
    def tokens(self) -> list[int]:
        return list(self.prompt["tokens"])

    def _row(self, p: int) -> dict:
        return self.entry["top_k"][self.index][p]

    def values(self, p: int, ids: list[int]) -> np.ndarray:
        row = dict(zip(self._row(p)["ids"], self._row(p)["logits"]))
        missing = [i for i in ids if i not in row]
        if missing:
            raise GoldenError(f"the recordings' top-{len(ids)} ids differ at prompt {self.index} position {p} "
                              f"({missing} recorded by one only): compare a run against the golden instead")
        return np.asarray([row[i] for i in ids], dtype=np.float64)

    def top(self, p: int, k: int) -> set[int]:
        return set(self._row(p)["ids"][:k])

    def argmax(self, p: int) -> int:
        return int(self._row(p)["ids"][0])

    def greedy(self) -> list[int]:
        return list(self.entry["greedy"][self.index])

    def stats(self) -> dict[str, float]:
        return dict(self.entry["stats"][self.index])


def stage_drift(entry: dict, outputs: list[RunOutput | RecordedOutput], golden: dict) -> dict[str, Any]:
    """How far a stage's outputs are from its golden, and where: positions with the golden's context only."""
    worst, top1_changes, greedy_diffs, diverged = None, [], [], []
    compared = agree = greedy_total = greedy_same = 0
    stats_err, kls, overlaps = 0.0, [], []
    for i, (out, prompt) in enumerate(zip(outputs, golden["prompts"], strict=True)):
        tokens = out.tokens
        same = common_prefix(tokens, prompt["tokens"])
        if same < len(tokens):
            diverged.append(f"prompt {i} from token {same}")
        usable = min(same, len(tokens) - 1, len(entry["top_k"][i]))  # position p sees tokens[0..p]
        for p in range(usable):
            row = entry["top_k"][i][p]
            got = out.values(p, row["ids"])
            want = np.asarray(row["logits"], dtype=np.float64)
            err = np.abs(got - want)
            k = int(err.argmax())
            if worst is None or err[k] > worst[0]:
                worst = (float(err[k]), i, p, row["ids"][k], float(got[k]), row["logits"][k])
            kls.append(_restricted_kl(want, got))
            overlaps.append(len(out.top(p, len(row["ids"])) & set(row["ids"])) / len(row["ids"]))
            compared += 1
            top = out.argmax(p)
            agree += top == row["ids"][0]
            if top != row["ids"][0]:
                top1_changes.append((i, p, top, row["ids"][0]))
        start = prompt["prompt_len"] - 1
        for j, (a, b) in enumerate(zip(out.greedy(), entry["greedy"][i])):
            if start + j < usable:
                greedy_total += 1
                greedy_same += a == b
                if a != b:
                    greedy_diffs.append((i, j, a, b))
        if same == len(tokens):
            now = out.stats()
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


def _check_prompts(golden: dict, path: Path, model: str, prompts: list[list[int]]) -> None:
    """The run's prompts must be the golden's (its continuations may differ: that is drift)."""
    then = [p["tokens"][:p["prompt_len"]] for p in golden["prompts"]]
    if prompts != then:
        which = next((i for i, (a, b) in enumerate(zip(prompts, then)) if a != b), min(len(prompts), len(then)))
        raise GoldenError(f"golden file {display_path(path)} was recorded on other prompts ({len(then)} prompts, this run "
                          f"{len(prompts)}; prompt {which} differs): the workload changed; regenerate it with "
                          f"`{update_command(model)}`")


def drift_records(golden: dict, path: Path, pair: ModelPair, logits: dict[str, list[np.ndarray]], trajectories,
                  gates: Gates, versions: dict[str, str] | None = None, strict: bool = False,
                  isa: list[str] | None = None) -> list[CheckResult]:
    """One `golden` result per stage that ran: drift from the golden held to [*.<stage>.golden] gates."""
    _check_prompts(golden, path, pair.name, [[int(x) for x in t.tokens[:t.prompt_len]] for t in trajectories])
    outputs = {stage: [RunOutput(lg, t) for lg, t in zip(logits[stage], trajectories, strict=True)]
               for stage in stage_names(logits)}
    return _judged_drift(golden, path, pair, outputs, gates, provenance_changes(golden, pair, versions, isa), strict)


def recording_drift_records(golden: dict, path: Path, pair: ModelPair, other: dict, gates: Gates) -> list[CheckResult]:
    """The `golden` results another recording of the pair (another host's) would get against `golden`, judged by
    the same gates as a run: whether a golden recorded there passes here, stage by stage."""
    _check_prompts(golden, path, pair.name, [p["tokens"][:p["prompt_len"]] for p in other["prompts"]])
    outputs = {stage: [RecordedOutput(entry, prompt, i) for i, prompt in enumerate(other["prompts"])]
               for stage, entry in other["stages"].items()}
    isa = other["provenance"].get("host", {}).get("isa") or []
    return _judged_drift(golden, path, pair, outputs, gates, provenance_changes(golden, pair, other["provenance"].get(
        "versions"), isa), strict=False)


def _judged_drift(golden: dict, path: Path, pair: ModelPair, outputs: dict[str, list], gates: Gates,
                  changes: list[str], strict: bool) -> list[CheckResult]:
    recorded = f"{display_path(path)} (recorded {golden['provenance'].get('recorded', '?')})"
    half = 0.5 * 10 ** -golden["format"]["decimals"]
    results = []
    for stage, stage_outputs in outputs.items():
        entry = golden["stages"].get(stage)
        if entry is None:
            command = update_command(pair.name)
            if stages.is_quantized(stage):
                command += f" --quant {stages.recipe_of(stage)}"
            results.append(CheckResult(pair.name, stage, GOLDEN, ERROR if strict else SKIP,
                                       message=f"{display_path(path)} has no golden for stage {stage}; "
                                               f"record it with `{command}`"))
            continue
        drift = stage_drift(entry, stage_outputs, golden)
        metrics = {k: drift[k] for k in ("max_abs_err", "mean_kl", "max_kl", "top5_overlap", "top1", "greedy_match",
                                         "max_stats_err", "positions")}
        metrics["changed"] = bool(drift["max_abs_err"] > 2 * half or drift["max_stats_err"] > 2 * half
                                  or drift["top1"] < 1 or drift["greedy_match"] < 1 or drift["diverged"])
        metrics["provenance_changes"] = changes
        context = (_where(drift) if metrics["changed"] else []) + [f"vs {recorded}"] + (
            [f"differs from its provenance: {'; '.join(changes)}"] if changes else [])
        results.append(judged(pair.name, stage, GOLDEN, metrics, gate_for(gates, pair, stage, GOLDEN),
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
            return drift_records(doc, golden_path(self.golden_dir, pair.name), pair, logits, trajectories, gates,
                           strict=self.strict)
        except GoldenError as e:
            return [CheckResult(pair.name, GOLDEN, GOLDEN, ERROR, message=str(e))]
