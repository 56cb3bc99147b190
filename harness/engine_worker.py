"""The LiteRT-LM engine's child: `python -m harness.engine_worker DIR` reads DIR/job.json (a bundle.EngineJob)
and writes DIR/result.json. It imports only litert_lm, so it starts in a second and a crash stays here."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def main(directory: str) -> None:
    import litert_lm

    job = json.loads((Path(directory) / "job.json").read_text())
    with litert_lm.ModelInfo(job["bundle"]) as info:
        context_length = info.max_context_tokens
    # The engine writes its XNNPack cache beside the bundle unless told where; the shared cache stays as built.
    # In the job's directory, which the parent removes even if this process is killed.
    with tempfile.TemporaryDirectory(prefix="litertlm-cache-", dir=directory) as cache_dir:
        engine = litert_lm.Engine(job["bundle"], backend=litert_lm.Backend.CPU(thread_count=job["num_threads"]),
                                  cache_dir=cache_dir, activation_data_type=litert_lm.ActivationDataType.FLOAT32)
        with engine:
            tokenized = [engine.tokenize(text) for text in job["texts"]]
            result = {
                "start_token_id": engine.bos_token_id,
                "stop_token_ids": engine.eos_token_ids,
                "context_length": context_length,
                "tokenized": tokenized,
                "detokenized": [engine.detokenize(ids) for ids in tokenized],
                "greedy": [],
                "token_scores": [],
            }
            greedy = litert_lm.SamplerConfig(top_k=1, top_p=1.0, temperature=0.0)
            for prompt in job["prompts"]:
                session = engine.create_session(apply_prompt_template=False, sampler_config=greedy,
                                                max_output_tokens=job["max_new_tokens"])
                with session:
                    session.run_prefill([prompt])
                    result["greedy"].append(session.run_decode().texts[0])
            # The prompt the engine's template makes of a conversation (the last message rendered after the others).
            if job["conversation"]:
                with engine.create_conversation(messages=job["conversation"][:-1]) as conversation:
                    rendered = conversation.render_message_to_string(job["conversation"][-1])
                result["rendered"], result["rendered_ids"] = rendered, engine.tokenize(rendered)
            # Each target's log-probability per token, as the engine scores it after prefilling its context.
            for context, target in job["scored"]:
                with engine.create_session(apply_prompt_template=False) as session:
                    session.run_prefill([context])
                    result["token_scores"].append(session.run_text_scoring([target]).token_scores[0])
    (Path(directory) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
