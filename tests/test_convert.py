"""Conversion (harness/convert.py): a quantized flatbuffer is the cached float one quantized as litert-torch's
converter does it, so it must be the very file the converter writes when asked for that recipe."""

import pytest

from harness.checkpoint import build_reauthored, reference_checkpoint
from harness.convert import convert, quantizer_recipe
from harness.lowering import export_config


@pytest.mark.parametrize("recipe, kv_layout", [("dynamic_int8", "default"), ("dynamic_int4_block32", "transposed")])
def test_a_quantized_flatbuffer_is_byte_identical_to_the_converters_own(tiny_llama, cache, tmp_path, recipe,
                                                                        kv_layout):
    from litert_torch.generative.utilities import converter

    checkpoint = reference_checkpoint(tiny_llama, cache)
    model, _ = build_reauthored(tiny_llama, checkpoint, tiny_llama.export.kv_cache_max)
    # The shared cache's entry (made from the float flatbuffer by convert's quantizing) or made here the same way.
    ours = convert(tiny_llama, model, checkpoint, recipe, cache, kv_layout=kv_layout).read_bytes()
    theirs = converter.convert_to_tflite(model, str(tmp_path), "theirs", list(tiny_llama.export.prefill_lens),
                                         tiny_llama.export.kv_cache_max, quantize=recipe,
                                         export_config=export_config(kv_layout))
    with open(theirs, "rb") as f:
        assert ours == f.read()


def test_float_has_no_quantizer_recipe_and_every_recipe_name_has_one(tiny_llama, cache):
    from harness.stages import QUANT_RECIPES

    model, _ = build_reauthored(tiny_llama, reference_checkpoint(tiny_llama, cache), tiny_llama.export.kv_cache_max)
    assert quantizer_recipe(model, "none") is None
    assert all(quantizer_recipe(model, recipe) for recipe in QUANT_RECIPES)
