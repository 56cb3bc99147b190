"""The HF reference checkpoint, and the re-authored model loaded from it through litert-torch."""

from __future__ import annotations

import collections
import contextlib
import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.cache import ArtifactCache
from harness.errors import CheckpointError, HarnessError
from harness.pairs import ModelPair, describe
from harness.records import library_versions


def _hf_classes(pair: ModelPair):
    import transformers

    model_class = getattr(transformers, pair.hf_class, None)
    if model_class is None:
        raise HarnessError(f"pair {pair.name!r}: transformers has no class {pair.hf_class!r}; fix hf_class")
    return model_class, model_class.config_class


def sensitize(model: torch.nn.Module, std: float, seed: int) -> None:
    """Random weights that make every component matter.

    Norm scales scatter around 1 and biases around 0 (neither trivially 0 or 1), and
    matrices get a std large enough that attention is far from uniform, so a wrong RoPE
    base or a leaky mask moves the logits by orders of magnitude more than float noise.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim == 1 and "norm" in name:
                param.copy_(1.0 + std * noise)
            else:
                param.copy_(std * noise)


def build_random_checkpoint(pair: ModelPair, out: Path) -> None:
    """The HF model of `pair` with seeded sensitive random weights, saved as safetensors + config.json."""
    from huggingface_hub.errors import StrictDataclassError  # transformers 5 validates configs with it

    model_class, config_class = _hf_classes(pair)
    try:
        # A copy: transformers fills in nested dicts (Phi3's rope_parameters gains partial_rotary_factor),
        # which would change the pair's golden and cache keys after a cold build.
        config = config_class(**copy.deepcopy(pair.hf_config))
    except (TypeError, ValueError, StrictDataclassError) as e:
        raise HarnessError(f"pair {pair.name!r}: hf_config does not fit {config_class.__name__}: {e}") from e
    torch.manual_seed(pair.seed)
    model = model_class(config).eval()
    sensitize(model, pair.init_std, pair.seed)
    model.save_pretrained(out, safe_serialization=True)


def checkpoint_key(pair: ModelPair) -> dict[str, Any]:
    """What shapes a reference checkpoint: the pair's config, seed and init, and the code that builds it."""
    builder = pair.checkpoint_builder or build_random_checkpoint
    return {
        "pair": pair.name,
        "hf_class": pair.hf_class,
        "hf_config": pair.hf_config,
        "seed": pair.seed,
        "init_std": pair.init_std,
        "builder": describe(builder),
        "versions": library_versions(("torch", "transformers", "safetensors")),
    }


def reference_checkpoint(pair: ModelPair, cache: ArtifactCache) -> Path:
    """The saved HF checkpoint (safetensors + config.json) of a pair, built once and cached."""
    if pair.checkpoint_builder is not None:
        return cache.get_or_build("checkpoint", checkpoint_key(pair), pair.checkpoint_builder)
    return cache.get_or_build("checkpoint", checkpoint_key(pair), lambda out: build_random_checkpoint(pair, out))


def load_hf(pair: ModelPair, checkpoint: Path) -> torch.nn.Module:
    """The HF reference from the saved checkpoint, eager attention so it can report attention maps."""
    model_class, _ = _hf_classes(pair)
    model = model_class.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


class _TrackedState(dict):
    """A checkpoint state dict that counts how often each tensor is taken."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self.original = list(tensors)
        self.taken: collections.Counter = collections.Counter()

    def pop(self, key, *default):
        if key in self:
            self.taken[key] += 1
        return super().pop(key, *default)

    def __getitem__(self, key):
        self.taken[key] += 1
        return super().__getitem__(key)


def build_reauthored(pair: ModelPair, checkpoint: Path, kv_cache_max: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Builds the re-authored model through litert-torch's loader and reports weight-mapping coverage.

    Coverage: every checkpoint tensor must be consumed exactly once, and every model
    parameter must come from the checkpoint. The latter is found by building twice,
    torch.nn.init's random initialisers filling with a different constant each time
    (_INIT_FILLS) and other draws under different seeds: a parameter that differs was
    left at its init.
    """
    from litert_torch.generative.utilities import loader as litert_loader

    def build(seed: int):
        states: list[_TrackedState] = []

        def tracking_loader(path: str):
            states.append(_TrackedState(litert_loader.load_safetensors(path)))
            return states[-1]

        torch.manual_seed(seed)
        try:
            with _dropped_by_load_state_dict() as dropped, _random_init_filled_with(_INIT_FILLS[seed]):
                model = pair.reauthored(str(checkpoint), tracking_loader, kv_cache_max)
        except KeyError as e:
            raise CheckpointError(
                f"checkpoint lacks {e.args[0]}; the re-authored model's tensor-name map expects it "
                "(fix the pair's tensor names, or rebuild the checkpoint)"
            ) from None
        except ValueError as e:
            if "Failed to map all tensor" in str(e):
                raise CheckpointError(f"checkpoint has tensors the re-authored model does not use: {e}") from None
            raise
        except RuntimeError as e:
            if "state_dict" in str(e):
                raise CheckpointError(f"re-authored model does not fit the checkpoint: {e}") from None
            raise
        if model is None or not states:
            raise CheckpointError(
                f"pair {pair.name!r}: the re-authored builder returned no model or never read the checkpoint "
                "through the custom loader it was given"
            )
        return model.eval(), states[-1], dropped

    model, state, dropped = build(1)
    twin, _, _ = build(2)
    unused = sorted(k for k in state.original if state.taken[k] == 0)
    reused = sorted(k for k in state.original if state.taken[k] > 1)
    twin_params = dict(twin.named_parameters())
    unloaded = sorted(
        name for name, p in model.named_parameters()
        if not torch.equal(p.detach(), twin_params[name].detach())
    )
    coverage = {
        "checkpoint_tensors": len(state.original),
        "unused": unused,
        "consumed_twice": reused,
        "dropped": sorted(dropped),
        "unloaded_params": unloaded,
    }
    return model, coverage


# What torch.nn.init's random initialisers fill with in each of build_reauthored's two builds (by seed).
_INIT_FILLS = {1: 0.25, 2: -0.5}
_RANDOM_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                        "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _random_init_filled_with(value: float):
    """torch.nn.init's random initialisers (what nn.Linear and nn.Embedding's reset_parameters call) fill with
    `value` while a builder runs. The two builds then differ in every weight the checkpoint leaves at its init, as
    two seeds' draws do, without drawing every weight twice: the real model's two builds spent ~10 s of ~28 s in
    kaiming_uniform_ and normal_ (py-spy, 2026-12-07). Draws elsewhere (a tensor's own normal_) stay seeded."""
    import torch.nn.init as init

    originals = {name: getattr(init, name) for name in _RANDOM_INITIALISERS}

    def fill(tensor, *args, **kwargs):
        with torch.no_grad():
            return tensor.fill_(value)

    for name in originals:
        setattr(init, name, fill)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(init, name, original)


@contextlib.contextmanager
def _dropped_by_load_state_dict():
    """The keys load_state_dict ignored while a builder ran: litert-torch's loader loads non-strictly when
    the head is tied, so a converted tensor no module takes (a QK norm the config lacks) vanishes silently."""
    dropped: list[str] = []
    original = torch.nn.Module.load_state_dict

    def recording(module, state_dict, strict=True, assign=False):
        result = original(module, state_dict, strict=strict, assign=assign)
        dropped.extend(result.unexpected_keys)
        return result

    torch.nn.Module.load_state_dict = recording
    try:
        yield dropped
    finally:
        torch.nn.Module.load_state_dict = original


def attention_entropy_ratio(hf_model: torch.nn.Module, prompts: list[np.ndarray]) -> float:
    """Mean attention entropy over the entropy of uniform attention on the visible keys (1 = uniform)."""
    ratios = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.as_tensor(prompt, dtype=torch.long)[None]
            attentions = hf_model(ids, output_attentions=True).attentions
            for layer in attentions:
                if layer is None:
                    continue
                probs = layer[0].double()  # heads x query x key
                visible = (probs > 0).sum(-1)
                entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
                keep = visible > 1
                ratios.append((entropy[keep] / torch.log(visible[keep].double())).mean().item())
    return float(np.mean(ratios)) if ratios else math.nan
