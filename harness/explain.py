"""`harness explain`: localise one pair's stage on demand, as a table, a curve and a script that reproduces it.

The reproduction is a short Python file written beside the report: it rebuilds the pair from this
repository (harness must be importable), runs both sides on the failing prompt, records the divergent point
and prints how the two tensors differ, so a maintainer can run it without the harness's command line.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from harness import stages
from harness.divergence import EPS, Divergence
from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT, display_path


@dataclasses.dataclass(frozen=True)
class Explanation:
    pair: str
    models_dirs: tuple[str, ...]  # as reports show them (relative to the project where they can be)
    prompt: int
    divergence: Divergence | None
    ranking: object = None  # a quantized stage's harness.quant_rank.Ranking (then no divergence)
    budget: float | None = None  # the quantized stage's max_mean_kl from the gates file
    flatbuffer: Path | None = None  # tflite_float: the flatbuffer localised, copied beside its reproduction


def find_pair(name: str, models_dirs=()):
    """The pair called `name`, from models/ and the extra folders (relative ones from the project root)."""
    from harness.pairs import scan, unknown_model_message

    dirs = []
    for d in models_dirs:
        path = Path(os.path.expandvars(os.path.expanduser(str(d))))
        dirs.append(path if path.is_absolute() else PROJECT_ROOT / path)
    pairs, broken = scan(tuple(dirs))
    if name not in pairs:
        raise HarnessError(unknown_model_message(name, pairs, broken))
    return pairs[name]


def check_stage(stage: str) -> None:
    """A stage explain can localise, or a one-line error saying which can."""
    from harness.localise import LOCALISERS

    if stage not in LOCALISERS and stage not in map(stages.tflite_stage, stages.QUANT_RECIPES):
        known = ", ".join(LOCALISERS) + "; and ranks tflite_<recipe> for " + ", ".join(stages.QUANT_RECIPES)
        known_stages = {*stages.FLOAT_STAGES, *map(stages.tflite_stage, stages.QUANT_RECIPES)}
        what = "has no localiser yet" if stage in known_stages else "is not a stage"
        raise HarnessError(f"--stage {stage} {what}; explain localises: {known}")


def check_prompt(pair, prompt: int):
    """The workload's prompt `prompt`, or a one-line error saying which there are (before any model is built)."""
    from harness.workload import make_prompts

    prompts = make_prompts(pair)
    if not 0 <= prompt < len(prompts):
        raise HarnessError(f"--prompt {prompt}: pair {pair.name} has prompts 0..{len(prompts) - 1}")
    return prompts[prompt]


@dataclasses.dataclass
class Sides:
    """What a stage and its parent need to run: the HF original, the re-authored twin, the exported programs
    (for `exported` and `stablehlo`) or the float flatbuffer (for `tflite_float`), and the tokens of the
    prompt followed by HF's greedy continuation."""

    hf_model: object
    model: object
    tokens: np.ndarray
    programs: dict | None = None
    flatbuffer: Path | None = None
    prompt_len: int | None = None  # the re-authored side prefills these and decodes the rest, as its stage does


def rebuild(pair, prompt: int, stage: str = stages.REAUTHORED, cache=None, flatbuffer: Path | None = None) -> Sides:
    """Both sides of `stage` on prompt `prompt` (every position but the last, as the stages run it). The exported
    programs and the float flatbuffer are the cache's (built into it on a miss), as the stages ran them; for
    tflite_float, `flatbuffer` if given (a reproduction's own copy)."""
    tokens = check_prompt(pair, prompt)
    from harness.cache import ArtifactCache
    from harness.checkpoint import build_reauthored, load_hf, reference_checkpoint
    from harness.config import default_cache_dir
    from harness.workload import greedy_trajectory

    cache = cache or ArtifactCache(Path(default_cache_dir()))
    checkpoint = reference_checkpoint(pair, cache)
    hf_model = load_hf(pair, checkpoint)
    model, _ = build_reauthored(pair, checkpoint, pair.export.kv_cache_max)
    trajectory, _ = greedy_trajectory(hf_model, tokens, pair.workload.new_tokens)
    programs = None
    if stage in (stages.EXPORTED, stages.STABLEHLO):
        from harness.convert import export_key
        from harness.lowering import converter_signatures
        from harness.programs import cached_programs

        signatures = converter_signatures(model, pair.export.prefill_lens, pair.export.kv_cache_max)
        _, programs = cached_programs(cache, export_key(pair, checkpoint, cache.code_digests()), signatures)
    if stage == stages.TFLITE_FLOAT and flatbuffer is None:  # from the cache, or converted once into it
        from harness.convert import FLOAT, convert

        flatbuffer = convert(pair, model, checkpoint, FLOAT, cache)
    return Sides(hf_model, model, trajectory.tokens[:-1], programs, flatbuffer, trajectory.prompt_len)


def values(pair, sides: Sides, stage: str, points):
    """Every point's values on both sides of `stage`: (parent's, stage's)."""
    from harness.localise import exported_points, run_points, stablehlo_points, tflite_points

    if stage == stages.EXPORTED:
        return exported_points(pair, sides.model, sides.programs, sides.tokens, points)
    if stage == stages.STABLEHLO:
        return stablehlo_points(pair, sides.model, sides.programs, sides.tokens, points)
    if stage == stages.TFLITE_FLOAT:
        return tflite_points(pair, sides.model, sides.flatbuffer, sides.tokens, points)
    return run_points(sides.hf_model, sides.model, sides.tokens, points, pair.export.kv_cache_max, sides.prompt_len)


def explain(pair, models_dirs, stage: str, prompt: int, gates, cache=None) -> Explanation:
    """Localises `stage` of `pair` on one prompt, whether or not it fails."""
    from harness.divergence import compare, pair_points
    from harness.localise import tolerance

    check_stage(stage)
    if stages.is_quantized(stage):
        return explain_quantized(pair, models_dirs, stage, gates, cache)
    sides = rebuild(pair, prompt, stage, cache)
    points = pair_points(pair, sides.model)
    divergence = compare(stage, points, *values(pair, sides, stage, points), tolerance(gates, pair, stage))
    return Explanation(pair.name, tuple(display_path(d) for d in models_dirs), prompt, divergence,
                       flatbuffer=sides.flatbuffer)


def explain_quantized(pair, models_dirs, stage: str, gates, cache=None) -> Explanation:
    """Ranks the weight groups of a quantized stage by the KL each costs quantized alone, over every prompt's
    trajectory (harness/quant_rank.py), against the float flatbuffer on the same trajectories."""
    from harness import quant_rank
    from harness.cache import ArtifactCache
    from harness.checkpoint import build_reauthored, load_hf, reference_checkpoint
    from harness.config import default_cache_dir
    from harness.convert import FLOAT, convert
    from harness.divergence import pair_points
    from harness.gates import gate_for
    from harness.runners import TFLiteRunner, run_trajectory
    from harness.workload import greedy_trajectory, make_prompts

    if stages.recipe_of(stage) not in pair.quant_recipes:
        raise HarnessError(f"--stage {stage}: recipe {stages.recipe_of(stage)} does not apply to {pair.name} "
                           f"(its recipes: {', '.join(pair.quant_recipes)})")
    cache = cache or ArtifactCache(Path(default_cache_dir()))
    checkpoint = reference_checkpoint(pair, cache)
    hf_model = load_hf(pair, checkpoint)
    model, _ = build_reauthored(pair, checkpoint, pair.export.kv_cache_max)
    trajectories = [greedy_trajectory(hf_model, p, pair.workload.new_tokens)[0] for p in make_prompts(pair)]
    flatbuffer = convert(pair, model, checkpoint, FLOAT, cache)
    runner = TFLiteRunner(flatbuffer, pair.export.prefill_lens, pair.export.kv_cache_max, 1)
    float_logits = [run_trajectory(runner, t) for t in trajectories]
    runner.release()
    ranking = quant_rank.rank(pair, model, stage, flatbuffer, float_logits, trajectories, pair_points(pair, model))
    budget = gate_for(gates, pair, stage, stages.QUANT_ACCURACY).thresholds.get("max_mean_kl")
    return Explanation(pair.name, tuple(display_path(d) for d in models_dirs), 0, None, ranking, budget)


def values_at(pair, sides: Sides, stage: str, point_name: str):
    """The two sides' values at one point, [position, features]: (parent's, stage's)."""
    from harness.divergence import pair_points

    point = [p for p in pair_points(pair, sides.model) if p.name == point_name]
    if not point:
        raise HarnessError(f"pair {pair.name} has no point {point_name!r}")
    reference, candidate = values(pair, sides, stage, point)
    return reference[point_name], candidate[point_name]


def difference(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> str:
    """How two tensors of one point differ, in a few lines: per position, and where the worst element is."""
    per_position = np.abs(candidate - reference).max(-1) / (np.abs(reference).max() + EPS)
    t, f = np.unravel_index(int(np.abs(candidate - reference).argmax()), reference.shape)
    past = np.flatnonzero(per_position > tolerance)
    return "\n".join([
        f"error per position (max |stage - parent| / max |parent|): {np.array2string(per_position, precision=3)}",
        f"first position past {tolerance:.3g}: {int(past[0]) if past.size else 'none'}",
        f"worst element: position {t}, feature {f}: parent {reference[t, f]:.6g}, stage {candidate[t, f]:.6g}",
    ])


def table(divergence: Divergence) -> str:
    from tabulate import tabulate

    rows = [[e.point.name, f"{e.error:.3g}", "" if e.position is None else e.position,
             "DIVERGES" if e is divergence.first else ("past" if e.position is not None else "")]
            for e in divergence.errors]
    return tabulate(rows, headers=["point", f"error (tolerance {divergence.tolerance:.3g})", "first position", ""])


def plot(divergence: Divergence, path: Path) -> Path:
    """The error at every point, in forward order, on a log scale, the tolerance as a line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    errors = [max(e.error, 1e-12) for e in divergence.errors]
    fig, ax = plt.subplots(figsize=(max(6.0, len(errors) * 0.3), 4.0))
    ax.semilogy(range(len(errors)), errors, marker="o", label=divergence.stage)
    ax.axhline(divergence.tolerance, color="red", linestyle="--", label="tolerance")
    if divergence.first:
        ax.axvline(divergence.errors.index(divergence.first), color="grey", linestyle=":")
    ax.set_xticks(range(len(errors)), [e.point.name for e in divergence.errors], rotation=90, fontsize=7)
    ax.set_ylabel("max |error| / max |reference|")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


REPRO = '''"""Reproduces where {stage} of pair {pair} first diverges from its parent:
{point} ({label}), position {position} of prompt {prompt} ({error:.3g}, tolerance {tolerance:.3g}).

Written by `harness explain`. Needs edge-parity's `harness` importable (installed, or PYTHONPATH set to the
checkout): python {name}
"""

from pathlib import Path

from harness import explain

PAIR, MODELS_DIRS, STAGE, PROMPT = {pair!r}, {models_dirs!r}, {stage!r}, {prompt!r}
POINT, TOLERANCE = {point!r}, {tolerance!r}
FLATBUFFER = {flatbuffer!r}  # the flatbuffer that diverged, written beside this script (None: rebuilt)

pair = explain.find_pair(PAIR, MODELS_DIRS)
flatbuffer = Path(__file__).resolve().with_name(FLATBUFFER) if FLATBUFFER else None
sides = explain.rebuild(pair, PROMPT, STAGE, flatbuffer=flatbuffer)  # both sides; prompt + HF's greedy continuation
reference, candidate = explain.values_at(pair, sides, STAGE, POINT)  # the parent's values, the stage's
print(f"{{PAIR}} {{STAGE}} at {{POINT}} on prompt {{PROMPT}} ({{len(reference)}} positions)")
print(explain.difference(reference, candidate, TOLERANCE))
'''


def repro_name(pair: str, stage: str, suffix: str = ".py") -> str:
    return f"repro_{pair}_{stage}{suffix}"


def repro_script(explanation: Explanation) -> str:
    first = explanation.divergence.first
    name = repro_name(explanation.pair, explanation.divergence.stage)
    return REPRO.format(stage=explanation.divergence.stage, pair=explanation.pair, point=first.point.name,
                        label=first.label, position=first.position, prompt=explanation.prompt,
                        error=first.error, tolerance=explanation.divergence.tolerance, name=name,
                        models_dirs=list(explanation.models_dirs),
                        flatbuffer=repro_name(explanation.pair, explanation.divergence.stage, ".tflite")
                        if explanation.flatbuffer else None)


def write_explanation(out: Path, explanation: Explanation) -> list[Path]:
    """The error curve (PNG) and, when something diverges, the reproduction script; returns what was written.
    A quantized stage's ranking is written as its table."""
    from harness.report import copy_atomic, write_report

    if explanation.ranking is not None:
        from harness import quant_rank

        path = Path(out) / f"ranking_{explanation.pair}_{explanation.ranking.stage}.txt"
        write_report(path, quant_rank.describe(explanation.ranking) + "\n\n" + quant_rank.table(explanation.ranking)
                     + "\n")
        return [path]

    stage = explanation.divergence.stage
    written = [plot(explanation.divergence, Path(out) / f"divergence_{explanation.pair}_{stage}.png")]
    if explanation.divergence.first and not explanation.divergence.first.absent:  # an absent module: nothing to run
        if explanation.flatbuffer:  # the artifact that diverged, not whatever a later build makes
            written.append(Path(out) / repro_name(explanation.pair, stage, ".tflite"))
            copy_atomic(explanation.flatbuffer, written[-1])
        written.append(Path(out) / repro_name(explanation.pair, stage))
        write_report(written[-1], repro_script(explanation))
    return written
