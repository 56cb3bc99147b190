"""The measurement side (harness.bench.worker): its runtime path decodes what the parity stages decode."""

from __future__ import annotations

import numpy as np

from harness.bench.worker import TOKEN, CompiledRunner
from harness.runners import TFLiteRunner


def test_compiled_runner_decodes_like_the_parity_runner(bench_artifacts, tiny_llama):
    path, lens = bench_artifacts[0].path, tiny_llama.export.prefill_lens
    compiled = CompiledRunner(str(path), 1)
    compiled.prefill(lens[0])
    step = compiled.decode_loop(lens[0])
    reference = TFLiteRunner(path, lens, tiny_llama.export.kv_cache_max, 1)
    _, kv = reference.prefill(np.full(lens[0], TOKEN, np.int32), reference.empty_kv())
    vocab = tiny_llama.hf_config["vocab_size"]
    for pos in range(lens[0], lens[0] + 3):
        step()
        expected, kv = reference.decode(TOKEN, pos, kv)
        got = compiled.outputs["decode"]["logits"].read(vocab, np.float32)
        np.testing.assert_allclose(got, expected.ravel(), rtol=1e-5, atol=1e-5)
