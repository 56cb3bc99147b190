"""Where a quantized stage's cost comes from: each weight group quantized alone, ranked by its KL to float.

A quantized flatbuffer is ai-edge-quantizer's rewrite of the float one under the recipe litert-torch's converter
translates from the recipe name (litert_converter: translate_to_ai_edge_recipe, then quantize_model). Each group
(one Linear or embedding of the re-authored model, found by the module scope its tensors are named after) gets
that same recipe narrowed to its own operators, the rest staying float; the flatbuffer runs along the HF
trajectories and its mean KL against the float flatbuffer's logits is the group's share. Quantization errors of
different layers compound, so the shares need not add up to the whole recipe's KL; the ranking says which group
alone costs the most ("mostly layer 1's MLP down projection").
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Any

from harness import child
from harness.divergence import Point


@dataclasses.dataclass(frozen=True)
class Share:
    """One weight group quantized alone: its name (a point's, e.g. layers.1.mlp.down), and its mean KL."""

    name: str
    layer: int | None
    mean_kl: float

    @property
    def label(self) -> str:
        return Point(self.name, self.layer, "", "").label


@dataclasses.dataclass(frozen=True)
class Ranking:
    """The whole recipe's mean KL against float, and every group's alone, largest first."""

    stage: str
    mean_kl: float
    shares: list[Share]

    def metrics(self) -> dict[str, Any]:
        top = self.shares[0] if self.shares else None
        return {"point": top.name if top else None, "label": top.label if top else None,
                "layer": top.layer if top else None, "mean_kl": self.mean_kl,
                "ranking": {s.name: s.mean_kl for s in self.shares}}


def groups(model, points: list[Point]) -> list[tuple[str, int | None, str]]:
    """(name, layer, scope pattern) of every Linear and embedding, named after the points they compute (the
    fused q/k/v projection: attention.qkv), in forward order. The quantizer knows an operator by its outputs'
    names: the head's output is the signature's logits tensor unless a soft-cap follows it in its own scope."""
    from harness.tflite_points import scope_of

    named = {}
    for p in points:
        if p.reauthored and p.reauthored not in named and p.take in ("output", "q", "k", "v"):
            fused = p.take in ("q", "k", "v")
            named[p.reauthored] = (p.name.rsplit(".", 1)[0] + ".qkv" if fused else p.name, p.layer)
    out = []
    for path, module in model.named_modules():
        if type(module).__name__ in ("Linear", "Embedding"):
            name, layer = named.get(path, (path, None))
            scope = rf"{re.escape(scope_of(model, path))}(?:;|$)"
            out.append((name, layer, scope + (r"|_logits_output;" if path == "lm_head" else "")))
    return out


def narrowed(recipe: list[dict], scope: str) -> list[dict]:
    """The recipe with every entry limited to operators whose scope (their output tensors' names) matches
    the pattern `scope`."""
    only = rf"^(?=[\s\S]*(?:{scope}))[\s\S]*?"
    return [dict(entry, regex=only + f"(?:{entry['regex']})") for entry in recipe]


def quantized_logits(float_bytes: bytes, recipe: list[dict], pair, trajectories, num_threads: int = 1):
    """The float flatbuffer quantized by `recipe`, run along the trajectories: logits per trajectory."""
    from harness.convert import quantize
    from harness.runners import TFLiteRunner, run_trajectory

    quantized = quantize(float_bytes, recipe)
    with tempfile.TemporaryDirectory(dir=child.scratch()) as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(quantized)
        runner = TFLiteRunner(path, pair.export.prefill_lens, pair.export.kv_cache_max, num_threads)
        logits = [run_trajectory(runner, t) for t in trajectories]
        runner.release()
    return logits


def rank(pair, model, stage: str, float_flatbuffer: Path, float_logits, trajectories, points: list[Point],
         recipe: list[dict] | None = None, num_threads: int = 1) -> Ranking:
    """Every weight group of `model` quantized alone by the stage's recipe, ranked by mean KL against float."""
    from harness import stages
    from harness.checks import kl_divergences

    from harness.convert import quantizer_recipe

    recipe = recipe if recipe is not None else quantizer_recipe(model, stages.recipe_of(stage))
    float_bytes = Path(float_flatbuffer).read_bytes()

    def cost(r):
        logits = quantized_logits(float_bytes, r, pair, trajectories, num_threads)
        return float(kl_divergences(logits, float_logits).mean())

    shares = [Share(name, layer, cost(narrowed(recipe, scope))) for name, layer, scope in groups(model, points)]
    return Ranking(stage, cost(recipe), sorted(shares, key=lambda s: -s.mean_kl))


def describe(ranking: Ranking) -> str:
    top = ranking.shares[:2]
    if not top:
        return f"quantization cost: {ranking.stage}, mean KL {ranking.mean_kl:.3g}, no weight group found"
    rest = f", then {top[1].label} ({top[1].mean_kl:.3g})" if len(top) > 1 else ""
    return (f"quantization cost: {ranking.stage}, mean KL {ranking.mean_kl:.3g} against tflite_float, mostly "
            f"{top[0].label} ({top[0].mean_kl:.3g} quantized alone){rest}")


def table(ranking: Ranking) -> str:
    from tabulate import tabulate

    rows = [[s.name, f"{s.mean_kl:.3g}", f"{s.mean_kl / ranking.mean_kl:.0%}" if ranking.mean_kl > 0 else ""]
            for s in ranking.shares]
    return tabulate(rows, headers=["quantized alone", "mean KL vs tflite_float", "of the whole recipe's"])
