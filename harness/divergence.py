"""Where a re-authored model first departs from its HF original: matched intermediate points, in order.

Each point is a pair of module paths, one in the HF model and one in the re-authored model, derived from the
pair's tensor-name map (the map that says which HF tensor becomes which re-authored one also says which
module computes what). Both models run the same tokens in one forward; forward hooks (and, for q/k after
RoPE, the function each side calls for it) record every point as [position, features]; `localise` finds the
first point whose error, scaled to the reference tensor's magnitude, exceeds the tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any

import numpy as np

# What a point is called in words (the summary line): the last part of its name.
LABELS = {"embedding": "token embedding", "input_norm": "input norm", "q": "q projection", "k": "k projection",
          "v": "v projection", "qkv": "attention q/k/v projection", "q_rope": "q after RoPE",
          "k_rope": "k after RoPE", "output": "attention output", "projection": "attention output projection",
          "post_attention_norm": "post-attention norm", "pre_ff_norm": "pre-MLP norm", "gate": "MLP gate projection",
          "up": "MLP up projection", "activation": "MLP activation (the down projection's input)",
          "down": "MLP down projection", "post_ff_norm": "post-MLP norm", "final_norm": "final norm",
          "head": "head", "logits": "output logits"}
EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Point:
    """One matched intermediate value: its name, and where each side computes it."""

    name: str  # e.g. layers.0.attention.q_rope
    layer: int | None
    hf: str  # HF module path
    reauthored: str  # re-authored module path
    take: str = "output"  # re-authored side: output | input (the first input) | q, k, v (of its fused qkv) | q_rope,
    # k_rope | logits (of the whole model, path "")
    hf_take: str = "output"  # HF side: the same, or fused_q, fused_k, fused_v of HF's own fused projection
    declared: bool = False  # the pair's own (ModelPair.divergence_points), not the tensor-name map's

    @property
    def label(self) -> str:
        where = f"layer {self.layer} " if self.layer is not None else ""
        last = self.name.rsplit(".", 1)[-1]
        return where + LABELS.get(last, last.replace("_", " "))


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0]


def points_of(names: Any, num_layers: int) -> list[Point]:
    """The points a tensor-name map (litert-torch's ModelLoader.TensorNames) lets us match, in forward order."""
    def named(field):
        return getattr(names, field, None)

    points = [Point("embedding", None, named("embedding"), "tok_embedding")] if named("embedding") else []
    for i in range(num_layers):
        block, at = f"transformer_blocks.{i}", f"layers.{i}"

        def add(point, field, reauthored, take="output", hf=None, hf_take=None):
            template = hf or named(field)
            if template:
                points.append(Point(f"{at}.{point}", i, template.format(i), f"{block}.{reauthored}", take,
                                    hf_take or (take if take in ("input", "q_rope", "k_rope") else "output")))

        qkv = "atten_func.qkv_projection"
        add("input_norm", "pre_attn_norm", "pre_atten_norm")
        if named("attn_fused_qkv_proj"):
            for part in "qkv":
                add(f"attention.{part}", "attn_fused_qkv_proj", qkv, part, hf_take=f"fused_{part}")
        else:
            for part, field in (("q", "attn_query_proj"), ("k", "attn_key_proj"), ("v", "attn_value_proj")):
                add(f"attention.{part}", field, qkv, part)
        if named("attn_output_proj"):
            attention = _parent(named("attn_output_proj"))
            add("attention.q_rope", None, "atten_func", "q_rope", hf=attention)
            add("attention.k_rope", None, "atten_func", "k_rope", hf=attention)
            add("attention.output", "attn_output_proj", "atten_func.output_projection", "input")
            add("attention.projection", "attn_output_proj", "atten_func.output_projection")
        add("post_attention_norm", "post_attn_norm", "post_atten_norm")
        add("pre_ff_norm", "pre_ff_norm", "ff.pre_ff_norm")
        add("mlp.gate", "ff_gate_proj", "ff.w1")
        add("mlp.up", "ff_up_proj", "ff.w3" if named("ff_gate_proj") else "ff.w1")
        # The down projection's input: gate and up combined. A map that swaps gate and up loads and matches
        # both the same wrong way round, so they agree one by one and the first disagreement is here.
        add("mlp.activation", "ff_down_proj", "ff.w2", "input")
        add("mlp.down", "ff_down_proj", "ff.w2")
        add("post_ff_norm", "post_ff_norm", "ff.post_ff_norm")
    if named("final_norm"):
        points.append(Point("final_norm", None, named("final_norm"), "final_norm"))
    points.append(Point("head", None, named("lm_head") or "lm_head", "lm_head"))
    points.append(Point("logits", None, "", "", "logits", "logits"))  # what the model returns: a final soft-cap
    return points


def with_declared(points: list[Point], declared, num_layers: int, pair_name: str) -> list[Point]:
    """`points` with a pair's declared ones (harness.pairs.DivergencePoint) each inserted after its `after`."""
    from harness.errors import HarnessError

    points = list(points)
    for d in declared:
        per_layer = "{}" in d.hf or "{}" in d.reauthored
        for layer in range(num_layers) if per_layer else (None,):
            at = f"layers.{layer}." if per_layer else ""
            index = next((i for i, p in enumerate(points) if p.name == at + d.after), None)
            if index is None:
                known = sorted({p.name.split(".", 2)[-1] if p.layer is not None else p.name for p in points})
                raise HarnessError(f"pair {pair_name!r}: divergence point {d.name!r} comes after {d.after!r}, which is "
                                   f"not one of its points ({', '.join(known)}); fix its `after`")
            points.insert(index + 1, Point(at + d.name, layer, d.hf.format(layer), d.reauthored.format(layer), d.take,
                                           d.hf_take, declared=True))
    return points


def pair_points(pair, model) -> list[Point]:
    """The points of a pair: by the tensor-name map its builder declares (harness.reauthor.decoder_builder's
    partial), else by the map of the litert-torch example module its model class (or a base class) comes from."""
    from harness.errors import HarnessError
    from harness.pairs import resolve

    args = getattr(pair.reauthored, "args", ())
    from_class = (getattr(sys.modules.get(c.__module__), "TENSOR_NAMES", None) for c in type(model).__mro__)
    names = resolve(args[1]) if len(args) == 3 else next((n for n in from_class if n is not None), None)
    if names is None:
        raise HarnessError(f"pair {pair.name!r}: neither its builder (not harness.reauthor.decoder_builder) nor its "
                           f"model class's module names a tensor-name map, so no module is known to match; build "
                           "it with decoder_builder to localise it")
    num_layers = model.config.num_layers
    return with_declared(points_of(names, num_layers), pair.divergence_points, num_layers, pair.name)


def as_rows(value, take: str, layout: dict) -> np.ndarray:
    """A captured tensor as [position, features] (batch 0), heads laid out as HF lays them out."""
    if take == "logits":  # the model's own output: HF's ModelOutput or litert-torch's dict
        value = value["logits"]
    t = value.detach().float()[0]
    if take in ("q", "k", "v"):  # the re-authored fused projection, split as CausalSelfAttention splits it
        heads, groups, dim = layout["heads"], layout["groups"], layout["head_dim"]
        if layout["transpose_before_split"]:
            parts = t.reshape(t.shape[0], -1, dim).split((heads, groups, groups), dim=1)
        else:
            parts = t.reshape(t.shape[0], groups, -1).split((heads // groups * dim, dim, dim), dim=-1)
        t = parts["qkv".index(take)]
    elif take.startswith("fused_"):  # HF's own fused projection: [q heads, k heads, v heads]
        heads, groups, dim = layout["heads"], layout["groups"], layout["head_dim"]
        t = t.split((heads * dim, groups * dim, groups * dim), dim=-1)["qkv".index(take[-1])]
    elif (take.endswith("_rope") and layout.get("heads_first")) or take == "heads":  # [heads, position, dim]
        t = t.transpose(0, 1)
    return t.reshape(t.shape[0], -1).numpy().astype(np.float64)


@contextlib.contextmanager
def _rope_taps(attentions: dict[Any, int], module, function: str, record):
    """Wraps the RoPE function `module.<function>` so its outputs are recorded under the calling layer."""
    original = getattr(module, function)
    current: list[int] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, i=i: current.append(i)) for m, i in attentions.items()]

    def leave(*_):  # a layer whose points were not asked for calls RoPE too: not ours
        current.pop()

    handles += [m.register_forward_hook(leave) for m in attentions]

    def tapped(q, k, *args, **kwargs):
        q_out, k_out = original(q, k, *args, **kwargs)
        if current:
            record(current[-1], q_out, k_out)
        return q_out, k_out

    setattr(module, function, tapped)
    try:
        yield
    finally:
        setattr(module, function, original)
        for h in handles:
            h.remove()


ABSENT = None  # what `capture` records for a declared point whose module the model lacks (with `absent`)


@contextlib.contextmanager
def capture(model, points: list[Point], side: str, layout: dict, absent: bool = False):
    """Records every point of `side` ("hf" or "reauthored") while the model runs: name -> [position, features].
    A declared point needs its module: missing from HF (whose modules transformers fixes), it is a mistake in
    the pair's file; missing from the re-authored side, it is recorded as ABSENT when `absent` (the eager
    model against HF: that module is what the re-authoring lost), else left out."""
    from harness.errors import HarnessError

    captured: dict[str, np.ndarray] = {}
    handles, rope = [], {}
    layout = dict(layout, heads_first=side == "hf")
    modules = dict(model.named_modules())
    for p in points:
        module = modules.get(getattr(p, side))
        take = p.take if side == "reauthored" else p.hf_take
        if module is None and p.declared and side == "hf":
            raise HarnessError(f"divergence point {p.name!r}: the HF model has no module {p.hf!r}; fix the pair's "
                               "divergence_points")
        if module is None:
            if p.declared and absent:
                captured[p.name] = ABSENT
            continue
        if take.endswith("_rope"):
            rope.setdefault(module, (p.layer, {}))[1][take] = p.name
        elif take == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, p=p, t=take: captured.__setitem__(p.name, as_rows(args[0], t, layout))))
        else:
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, p=p, t=take: captured.__setitem__(p.name, as_rows(out, t, layout))))

    def record(layer, q, k):
        for take, value in (("q_rope", q), ("k_rope", k)):
            name = next((names[take] for _, (i, names) in rope.items() if i == layer and take in names), None)
            if name:
                captured[name] = as_rows(value, take, layout)

    with contextlib.ExitStack() as stack:
        if rope:
            where, function = _rope_function(model, side, next(iter(rope)))
            if where is not None:
                stack.enter_context(_rope_taps({m: i for m, (i, _) in rope.items()}, where, function, record))
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()


def _rope_function(model, side: str, attention):
    """The module and name of the function the attention calls for RoPE (a module global, looked up per call)."""
    if side == "reauthored":
        from litert_torch.generative.layers import rotary_position_embedding

        return rotary_position_embedding, "apply_rope_inline"
    module = sys.modules.get(type(attention).__module__)
    return (module, "apply_rotary_pos_emb") if hasattr(module, "apply_rotary_pos_emb") else (None, None)


def layout_of(model) -> dict:
    """How the re-authored attention lays out heads (layer 0's config: the tiny pairs share it across layers)."""
    attn = model.config.block_config(0).attn_config
    return {"heads": attn.num_heads, "groups": attn.num_query_groups, "head_dim": attn.head_dim,
            "transpose_before_split": attn.qkv_transpose_before_split}


@dataclasses.dataclass(frozen=True)
class PointError:
    """One point's error: the worst over positions, and the first position past the tolerance (None: none)."""

    point: Point
    error: float
    position: int | None
    absent: bool = False  # a declared point whose module the stage's model lacks: counted as wholly wrong (1.0)

    @property
    def label(self) -> str:
        return self.point.label + (f" (absent: no module {self.point.reauthored})" if self.absent else "")


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Every matched point's error, in forward order, and the first past the tolerance (None: nothing diverges)."""

    stage: str
    tolerance: float
    errors: list[PointError]

    @property
    def first(self) -> PointError | None:
        return next((e for e in self.errors if e.position is not None), None)

    def metrics(self) -> dict[str, Any]:
        """A divergence record's metrics: the first divergent point, and the error at every point."""
        first = self.first
        return {"point": first.point.name if first else None, "label": first.label if first else None,
                "layer": first.point.layer if first else None, "position": first.position if first else None,
                "error": first.error if first else max((e.error for e in self.errors), default=0.0),
                "tolerance": self.tolerance, "points": {e.point.name: e.error for e in self.errors}}


def point_error(point: Point, reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> PointError:
    """max |candidate - reference| per position over max |reference|: the error scaled to the tensor's size."""
    per_position = np.abs(candidate - reference).max(-1) / (np.abs(reference).max() + EPS)
    past = np.flatnonzero(~(per_position <= tolerance))  # NaN counts as past
    return PointError(point, float(np.nanmax(per_position)) if not np.isnan(per_position).all() else float("nan"),
                      int(past[0]) if past.size else None)


def compare(stage: str, points: list[Point], reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            tolerance: float) -> Divergence:
    """The points both sides recorded in the same shape, compared in forward order (a partial rotary's RoPE
    output, say, is a slice on one side and whole on the other: not comparable, left out). A declared point
    the candidate recorded as ABSENT counts as wholly wrong from position 0."""
    errors = []
    for p in points:
        ours, theirs = reference.get(p.name, ABSENT), candidate.get(p.name, ABSENT)
        if ours is not ABSENT and theirs is ABSENT and p.name in candidate:
            errors.append(PointError(p, 1.0, 0, absent=True))
        elif ours is not ABSENT and theirs is not ABSENT and ours.shape == theirs.shape:
            errors.append(point_error(p, ours, theirs, tolerance))
    return Divergence(stage, tolerance, errors)
