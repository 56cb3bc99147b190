"""The divergence check: for a failing stage, the first matched point where it departs from its parent.

Stages that can be localised are a table (`LOCALISERS`: stage -> function of the run state); today the
re-authored model against HF, the exported programs against the re-authored model, the lowered StableHLO
against the exported programs, and the float flatbuffer against the re-authored model. A divergence record
is informational (status info): it never passes or fails a run, it says where the failure the gated checks
found begins.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from harness import stages
from harness.divergence import ABSENT, Divergence, Point, capture, compare, layout_of, pair_points
from harness.errors import HarnessError
from harness.records import FAIL, INFO, CheckResult

if TYPE_CHECKING:
    from harness.pipeline import RunState


def run_points(hf_model, model, tokens: np.ndarray, points: list[Point], kv_cache_max: int,
               prompt_len: int | None = None):
    """Both models on the same tokens, every point recorded: (HF's values, the re-authored ones). HF runs one
    forward; the re-authored model prefills the first `prompt_len` tokens and decodes the rest one at a time,
    as its stage runs a trajectory (None: one prefill of all), so a defect of decoding shows at its position."""
    import torch

    from harness.runners import ReauthoredRunner

    layout = layout_of(model)
    with capture(hf_model, points, "hf", layout) as reference, torch.no_grad():
        hf_model(torch.as_tensor(tokens, dtype=torch.long)[None])
    runner = ReauthoredRunner(model, kv_cache_max)
    prompt_len = len(tokens) if prompt_len is None else min(prompt_len, len(tokens))
    steps = []
    with capture(model, points, "reauthored", layout, absent=True) as candidate:
        _, kv = runner.prefill(tokens[:prompt_len], runner.empty_kv())
    steps.append(candidate)
    for pos in range(prompt_len, len(tokens)):
        with capture(model, points, "reauthored", layout, absent=True) as step:
            _, kv = runner.decode(int(tokens[pos]), pos, kv)
        steps.append(step)
    candidate = {name: ABSENT if steps[0][name] is ABSENT else np.concatenate([s[name] for s in steps])
                 for name in steps[0] if all(name in s for s in steps)}
    scale = model.config.embedding_scale
    embedding = next((p for p in points if p.name == "embedding"), None)
    if embedding and scale and hasattr(hf_model.get_submodule(embedding.hf), "embed_scale") and "embedding" in candidate:
        candidate["embedding"] = candidate["embedding"] * scale  # HF scales inside the module (Gemma), litert after
    return reference, candidate


def localise_reauthored(pair, hf_model, model, tokens: np.ndarray, tolerance: float,
                        prompt_len: int | None = None) -> Divergence:
    """The re-authored model against HF at every matched point, on `tokens` (prefilling `prompt_len` of them
    and decoding the rest, or one prefill of all)."""
    points = pair_points(pair, model)
    reference, candidate = run_points(hf_model, model, tokens, points, pair.export.kv_cache_max, prompt_len)
    return compare(stages.REAUTHORED, points, reference, candidate, tolerance)


def _padded(pair, tokens: np.ndarray):
    """The tokens cut to the longest prefill and padded to their signature: (tokens, padded, positions)."""
    from harness.runners import signature_for

    tokens = tokens[:max(pair.export.prefill_lens)]  # the longest prefill: the exported programs' own positions
    length = signature_for(len(tokens), pair.export.prefill_lens)
    padded, positions = np.zeros((1, length), np.int32), np.arange(length, dtype=np.int32)
    padded[0, :len(tokens)] = tokens
    return tokens, padded, positions


def _eager_padded(pair, model, padded, positions, points: list[Point]) -> dict:
    """The eager re-authored model's points on the padded tokens of a prefill signature (every position)."""
    from harness.runners import ReauthoredRunner

    runner = ReauthoredRunner(model, pair.export.kv_cache_max)
    with capture(model, points, "reauthored", layout_of(model)) as reference:
        runner.call(f"prefill_{padded.shape[1]}", padded, positions, runner.empty_kv())
    return reference


def exported_points(pair, model, programs: dict, tokens: np.ndarray, points: list[Point]):
    """The eager re-authored model and the torch.export program of the tokens' prefill signature on the same
    padded tokens, every point recorded on the real positions: (re-authored values, exported values).
    torch.export.unflatten restores the module tree the converter traced (inside its wrapper), so the same hooks
    apply; traced code calls no RoPE function, so q/k after RoPE are not recorded on the exported side."""
    import torch

    from harness.runners import ReauthoredRunner

    tokens, padded, positions = _padded(pair, tokens)
    n, length = len(tokens), padded.shape[1]
    reference = _eager_padded(pair, model, padded, positions, points)
    unflattened = torch.export.unflatten(programs[f"prefill_{length}"])
    wrapper = next(name[:-len("tok_embedding")] for name, _ in unflattened.named_modules()
                   if name.endswith("tok_embedding"))  # the converter's wrapper, e.g. "module."
    traced = [dataclasses.replace(p, reauthored=wrapper + p.reauthored if p.reauthored else "") for p in points]
    runner = ReauthoredRunner(model, pair.export.kv_cache_max)
    with capture(unflattened, traced, "reauthored", layout_of(model)) as candidate, torch.no_grad():
        unflattened(tokens=torch.as_tensor(padded), input_pos=torch.as_tensor(positions), kv_cache=runner.empty_kv())
    return ({k: v[:n] for k, v in reference.items()}, {k: v[:n] for k, v in candidate.items()})


def tflite_points(pair, model, flatbuffer, tokens: np.ndarray, points: list[Point]):
    """The eager re-authored model and the float flatbuffer's prefill signature (no delegate, every tensor
    kept: harness/tflite_points.py) on the same padded tokens: (re-authored values, flatbuffer values)."""
    from harness.tflite_points import tflite_values

    tokens, padded, positions = _padded(pair, tokens)
    n = len(tokens)
    reference = _eager_padded(pair, model, padded, positions, points)
    candidate = tflite_values(flatbuffer, model, points, padded, positions,
                              {name: value.shape[1] for name, value in reference.items()})
    return ({k: v[:n] for k, v in reference.items()}, {k: v[:n] for k, v in candidate.items()})


def stablehlo_points(pair, model, programs: dict, tokens: np.ndarray, points: list[Point]):
    """The exported prefill program of the tokens' signature and its lowered StableHLO on the same padded tokens,
    every point recorded on the real positions (harness/stablehlo_points.py): (exported values, StableHLO values)."""
    from harness.lowering import fits_inline
    from harness.stablehlo_points import stablehlo_values

    tokens, padded, positions = _padded(pair, tokens)
    n = len(tokens)
    reference, candidate = stablehlo_values(programs[f"prefill_{padded.shape[1]}"], points, padded, positions,
                                            layout_of(model), fits_inline(model))
    return ({k: v[:n] for k, v in reference.items()}, {k: v[:n] for k, v in candidate.items()})


def localise_stablehlo(pair, model, programs: dict, tokens: np.ndarray, tolerance: float) -> Divergence:
    """The lowered StableHLO's prefill against the exported program it was lowered from, at module boundaries."""
    points = pair_points(pair, model)
    reference, candidate = stablehlo_points(pair, model, programs, tokens, points)
    return compare(stages.STABLEHLO, points, reference, candidate, tolerance)


def localise_tflite(pair, model, flatbuffer, tokens: np.ndarray, tolerance: float) -> Divergence:
    """The float flatbuffer's prefill against the eager re-authored model at the points it computes readably."""
    points = pair_points(pair, model)
    reference, candidate = tflite_points(pair, model, flatbuffer, tokens, points)
    return compare(stages.TFLITE_FLOAT, points, reference, candidate, tolerance)


def localise_exported(pair, model, programs: dict, tokens: np.ndarray, tolerance: float) -> Divergence:
    """The exported prefill program against the eager re-authored model at the same module points."""
    points = pair_points(pair, model)
    reference, candidate = exported_points(pair, model, programs, tokens, points)
    return compare(stages.EXPORTED, points, reference, candidate, tolerance)


def tolerance(state_or_gates, pair, stage: str) -> float:
    """The divergence tolerance of a stage, from the gates file ([defaults.<stage>.divergence] max_error)."""
    from harness.gates import gate_for

    gates = getattr(getattr(state_or_gates, "options", None), "gates", state_or_gates)
    thresholds = gate_for(gates, pair, stage, stages.DIVERGENCE).thresholds
    if "max_error" not in thresholds:
        raise HarnessError(f"the gates file has no [defaults.{stage}.divergence] max_error: the tolerance a matched "
                           "point is held to; add it (harness/gates.toml shows the measured value)")
    return float(thresholds["max_error"])


def _reauthored(state: RunState, prompt: int) -> Divergence:
    from harness.checkpoint import load_hf

    hf_model = load_hf(state.pair, state.checkpoint)
    trajectory = state.trajectories[prompt]
    return localise_reauthored(state.pair, hf_model, state.model, trajectory.tokens[:-1],
                               tolerance(state, state.pair, stages.REAUTHORED), trajectory.prompt_len)


def _exported(state: RunState, prompt: int) -> Divergence:
    return localise_exported(state.pair, state.model, state.programs, state.trajectories[prompt].tokens[:-1],
                             tolerance(state, state.pair, stages.EXPORTED))


def _stablehlo(state: RunState, prompt: int) -> Divergence:
    return localise_stablehlo(state.pair, state.model, state.programs, state.trajectories[prompt].tokens[:-1],
                              tolerance(state, state.pair, stages.STABLEHLO))


def _tflite_float(state: RunState, prompt: int) -> Divergence:
    return localise_tflite(state.pair, state.model, state.artifacts[stages.TFLITE_FLOAT],
                           state.trajectories[prompt].tokens[:-1], tolerance(state, state.pair, stages.TFLITE_FLOAT))


LOCALISERS: dict[str, Callable[[RunState, int], Divergence]] = {stages.REAUTHORED: _reauthored,
                                                                stages.EXPORTED: _exported,
                                                                stages.STABLEHLO: _stablehlo,
                                                                stages.TFLITE_FLOAT: _tflite_float}


def localisable(stage: str) -> bool:
    """A stage the divergence step says something about: a localiser's, or a quantized stage (a ranking)."""
    return stage in LOCALISERS or stages.is_quantized(stage)


def rank_quantized(state: RunState, stage: str) -> CheckResult:
    """A failing quantized stage's weight groups, each quantized alone, ranked by KL against the float
    flatbuffer along the same trajectories (harness/quant_rank.py)."""
    from harness import quant_rank

    start = time.perf_counter()
    ranking = quant_rank.rank(state.pair, state.model, stage, state.artifacts[stages.TFLITE_FLOAT],
                              state.logits[stages.TFLITE_FLOAT], state.trajectories,
                              pair_points(state.pair, state.model), num_threads=state.options.num_threads)
    metrics = {**ranking.metrics(), "seconds": round(time.perf_counter() - start, 2)}
    return CheckResult(state.pair.name, stage, stages.DIVERGENCE, INFO, metrics, {}, quant_rank.describe(ranking))


def describe(divergence: Divergence) -> str:
    """The divergence in words: its first point, position, error and tolerance, or that nothing diverges."""
    first = divergence.first
    if first is None:
        return (f"nothing diverges: {len(divergence.errors)} matched points within {divergence.tolerance:.3g} "
                f"(worst {max((e.error for e in divergence.errors), default=0.0):.3g})")
    return (f"first divergence: {divergence.stage}, {first.label}, position {first.position} "
            f"({first.error:.3g}, tolerance {divergence.tolerance:.3g})")


def divergence_record(model: str, divergence: Divergence, prompt: int, seconds: float) -> CheckResult:
    metrics = {**divergence.metrics(), "prompt": prompt, "seconds": round(seconds, 2)}
    return CheckResult(model, divergence.stage, stages.DIVERGENCE, INFO, metrics,
                       {"max_error": divergence.tolerance}, describe(divergence))


def failing_prompt(results: list[CheckResult], stage: str) -> int:
    """The prompt of the stage's worst logit error (the logits check says which), else the first."""
    return next((int(r.metrics.get("worst_prompt", 0)) for r in results
                 if r.stage == stage and r.check == stages.LOGITS), 0)


def localise_failures(state: RunState, results: list[CheckResult]) -> list[CheckResult]:
    """One divergence record per failing stage that has a localiser, on the prompt where it fails worst, and
    one ranking per failing quantized stage."""
    failing = {r.stage for r in results if r.status == FAIL}
    records = []
    for stage, localiser in LOCALISERS.items():
        if stage in failing and stage in state.completed:
            start = time.perf_counter()
            prompt = failing_prompt(results, stage)
            records.append(divergence_record(state.pair.name, localiser(state, prompt), prompt,
                                             time.perf_counter() - start))
    for stage in sorted(s for s in failing if stages.is_quantized(s) and s in state.completed):
        if stages.TFLITE_FLOAT in state.artifacts:
            records.append(rank_quantized(state, stage))
    return records
