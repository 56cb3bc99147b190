"""The artifact that ships: a .litertlm bundle (flatbuffer, tokenizer, start/stop ids, context length) built
with litert-torch's litertlm_builder, and run by the LiteRT-LM engine in a child process of its own.

The engine reads the KV cache's sequence length from dimension 2, so a bundle's flatbuffer is converted with
the transposed KV layout (a flatbuffer of its own, cached like the others). Tiny pairs have no tokenizer of
their own: they get a word-level one, one word per id, so that ids are recovered from the engine's text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness.cache import ArtifactCache, file_digest
from harness.errors import HarnessError
from harness.pairs import ModelPair, describe
from harness.paths import scrub

BUNDLE = "litertlm"  # the cache's kind for bundles
BUNDLE_FILE = "model.litertlm"
TOKENIZER_FILE = "tokenizer.json"
SPECIALS = ("<pad>", "<bos>", "<eos>")  # the word tokenizer's ids 0, 1, 2 (HF's pad/bos/eos defaults for tiny pairs)
ENGINE_TIMEOUT_S = 600

# The tokenizer check's texts: words, runs of whitespace, Unicode the word tokenizer does not know (one
# <pad> each) and every special token, so a bundle whose tokenizer differs from HF's shows on one of them.
TOKENIZER_TEXTS = (
    "w5 w17 w200 w33",
    "  w9\tw10\n\nw11  ",
    "héllo wörld 東京 🙂",
    "<bos> w3 <eos> w4 <pad>",
    "w3w4 w255",
)


@dataclasses.dataclass(frozen=True)
class BundleSettings:
    """What the builder writes into a bundle beside its flatbuffer, read from the pair's HF checkpoint."""

    start_token_id: int
    stop_token_ids: tuple[int, ...]
    context_length: int


def word_vocab(vocab_size: int) -> dict[str, int]:
    """The word tokenizer's vocabulary: the specials, then "w<id>" for every other id."""
    vocab = {name: i for i, name in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    return vocab


def word_tokenizer(vocab: dict[str, int]):
    """One word per id, split on whitespace: text round-trips to the same ids, so greedy text from the engine
    is comparable token by token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with one space
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return tokenizer


def tokenizer_file(pair: ModelPair, checkpoint: Path, out: Path) -> Path:
    """The tokenizer.json a bundle is built with: the checkpoint's own (the real model's, from its GGUF), else
    the word tokenizer of the pair's vocabulary."""
    own = checkpoint / TOKENIZER_FILE
    path = out / TOKENIZER_FILE
    if own.exists():
        path.write_bytes(own.read_bytes())
    else:
        word_tokenizer(word_vocab(int(pair.hf_config["vocab_size"]))).save(str(path))
    return path


def hf_tokenizer(pair: ModelPair, checkpoint: Path):
    """The HF tokenizer a bundle's is compared with, made apart from the bundled file (transformers' fast
    tokenizer over the checkpoint's tokenizer.json, or over the word tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    own = checkpoint / TOKENIZER_FILE
    if own.exists():
        return PreTrainedTokenizerFast(tokenizer_file=str(own))
    vocab = word_vocab(int(pair.hf_config["vocab_size"]))
    return PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(vocab))


def hf_settings(pair: ModelPair, checkpoint: Path) -> BundleSettings:
    """Start and stop ids from the checkpoint's generation config (else its model config), the context length
    the flatbuffer was exported with."""
    config = json.loads((checkpoint / "config.json").read_text())
    generation = checkpoint / "generation_config.json"
    source = {**config, **(json.loads(generation.read_text()) if generation.exists() else {})}
    if source.get("bos_token_id") is None or source.get("eos_token_id") is None:
        raise HarnessError(f"pair {pair.name!r}: the checkpoint's config names no bos_token_id or eos_token_id; "
                           "a bundle needs both (set them in hf_config)")
    eos = source["eos_token_id"]
    stops = tuple(eos) if isinstance(eos, list) else (eos,)
    return BundleSettings(int(source["bos_token_id"]), tuple(int(s) for s in stops), pair.export.kv_cache_max)


def bundle_key(flatbuffer: Path, tokenizer: Path, settings: BundleSettings) -> dict:
    """Everything that shapes a bundle: the bytes of its flatbuffer and tokenizer, what the builder writes and
    the builder's code (bundles embed a uuid and a time, so the bundle's own bytes are not reproducible)."""
    from harness.provenance import code_digests

    return {"flatbuffer": file_digest(flatbuffer), "tokenizer": file_digest(tokenizer),
            "settings": dataclasses.asdict(settings), "bundle_code": describe(build_bundle),
            "builder": code_digests(distributions=("litert-lm-builder",))}


def build_bundle(flatbuffer: Path, tokenizer: Path, settings: BundleSettings, cache: ArtifactCache) -> Path:
    """The .litertlm bundle of a flatbuffer with its tokenizer and settings, built once per key."""
    from litert_torch.generative.utilities import litertlm_builder

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory() as work:
            litertlm_builder.build_litertlm(
                str(flatbuffer), work, work, settings.context_length, hf_tokenizer_model_path=str(tokenizer),
                start_token_id=settings.start_token_id, stop_token_ids=list(settings.stop_token_ids))
            built = list(Path(work).glob("*.litertlm"))
            if len(built) != 1:
                raise HarnessError(f"litertlm_builder wrote {len(built)} bundles, expected one")
            built[0].rename(out / BUNDLE_FILE)

    return cache.get_or_build(BUNDLE, bundle_key(flatbuffer, tokenizer, settings), build) / BUNDLE_FILE


@dataclasses.dataclass(frozen=True)
class EngineJob:
    """What the engine child does with one bundle: tokenize and detokenize texts, greedy-generate from
    prompts (text, the engine adds the start token), and read back the bundle's start and stop ids."""

    bundle: str
    texts: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 8
    num_threads: int = 1


def run_engine(job: EngineJob) -> dict[str, Any]:
    """Runs `job` in a fresh interpreter (harness.engine_worker) whose log goes to a file: a crash or an
    engine error loses only this stage, and the error carries the engine's own reason from its log."""
    with tempfile.TemporaryDirectory(prefix="edge-parity-engine-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "job.json").write_text(json.dumps(dataclasses.asdict(job)))
        log = tmp_path / "engine.log"
        with log.open("wb") as sink:
            try:
                done = subprocess.run([sys.executable, "-m", "harness.engine_worker", str(tmp_path)],
                                      stdout=sink, stderr=sink, timeout=ENGINE_TIMEOUT_S,
                                      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
            except subprocess.TimeoutExpired:
                raise HarnessError(f"the LiteRT-LM engine did not finish in {ENGINE_TIMEOUT_S} s"
                                   f"{engine_reason(log)}") from None
        result = tmp_path / "result.json"
        if done.returncode != 0 or not result.exists():
            how = f"exit code {done.returncode}" if done.returncode >= 0 else f"signal {-done.returncode}"
            raise HarnessError(f"the LiteRT-LM engine failed ({how}){engine_reason(log)}")
        return json.loads(result.read_text())


def engine_reason(log: Path, lines: int = 4) -> str:
    """The engine's own error lines (absl's E..., F..., and Python's last line), which its Python layer
    leaves on stderr only."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    reasons = [line for line in text if line[:1] in "EF" and "]" in line] or text[-1:]
    return (": " + " | ".join(scrub(r.split("] ", 1)[-1]) for r in reasons[-lines:])) if reasons else ""


def hf_expected_metadata(checkpoint: Path) -> dict[str, Any]:
    """What the engine should read from a bundle, as transformers reads the checkpoint's generation config:
    the start id, and each stop id as a one-token stop sequence (the engine's eos_token_ids)."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(checkpoint)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    return {"start_token_id": config.bos_token_id, "stop_token_ids": [[int(e)] for e in eos]}
