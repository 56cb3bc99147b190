"""A real model on real text: perplexity, KL and top-1 of HF and every flatbuffer, and their greedy text.

Runs as a pair's extra check once every stage has run. Each document of the shipped corpus
(harness/data, licenses in data/LICENSE.md) is cut into windows as long as the KV cache. HF
reads a window in one forward; a flatbuffer reads it through its largest prefill signature,
chunk after chunk at increasing positions, so a window longer than a sliding-attention window
exercises the KV cache and the local mask too. Over a 262k vocabulary a window's logits weigh
GiBs, so every metric is accumulated chunk by chunk and the logits are dropped.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from harness import child, stages
from harness.checkpoint import load_hf
from harness.checks import judged
from harness.errors import HarnessError
from harness.gates import gate_for
from harness.memory import release_freed
from harness.pairs import ModelPair
from harness.records import CheckResult

REAL_TEXT = "real_text"  # the stage this extra check runs as
PERPLEXITY = stages.PERPLEXITY
GREEDY_TEXT = stages.GREEDY_TEXT

DATA_DIR = Path(__file__).with_name("data")
CORPUS = ("prose_original.txt", "prose_python.txt", "code_python.txt")
MIN_WINDOW = 32  # a document's tail shorter than this is not a window of its own
ROWS = 16  # positions per float64 softmax: ~0.2 GiB a step at 262k vocab (64: real text peaked 0.2 GiB higher, 20% slower)


def corpus() -> dict[str, str]:
    """The shipped documents by file name."""
    return {name: (DATA_DIR / name).read_text() for name in CORPUS}


def load_tokenizer(checkpoint: Path):
    """The tokenizer saved beside the checkpoint's weights."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as e:
        raise HarnessError(f"checkpoint {checkpoint} has no tokenizer ({e}); the real-text check decodes with the "
                           "tokenizer the pair's checkpoint_builder saves beside the weights") from None


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a document, after BOS when the tokenizer has one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)


def windows(ids: list[int], length: int) -> list[np.ndarray]:
    """A document's ids cut into windows of at most `length`, each one starting again at BOS (ids[0])."""
    head, body = ids[:1], ids[1:]
    step = length - 1
    cut = [head + body[i:i + step] for i in range(0, len(body), step)]
    return [np.asarray(w, dtype=np.int64) for w in cut if len(w) >= MIN_WINDOW]


def prompt_records(tokenizer, length: int) -> list[dict[str, Any]]:
    """The first `length` ids of each document: the real-text prompts a TextWorkload ships."""
    records = []
    for name, text in corpus().items():
        ids = encode(tokenizer, text)[:length]
        records.append({"source": name, "text": tokenizer.decode(ids[1:]), "ids": ids})
    return records


def write_prompts(tokenizer, length: int, path: Path) -> None:
    """Regenerates a shipped prompts file from the tokenizer (after the corpus or the tokenizer changed)."""
    lines = [json.dumps(record, ensure_ascii=False) for record in prompt_records(tokenizer, length)]
    Path(path).write_text('{"prompts": [\n' + ",\n".join(lines) + "\n]}\n")


def load_prompts(path: Path) -> list[list[int]]:
    """The token ids of a shipped prompts file."""
    return [p["ids"] for p in json.loads(Path(path).read_text())["prompts"]]


def hf_chunks(model, window: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    """HF logits of a window, one forward for all of it, handed out `chunk` positions at a time."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    with torch.no_grad():
        hidden = model.model(torch.as_tensor(window)[None]).last_hidden_state[0]
        for start in range(0, len(window), chunk):
            logits = model.lm_head(hidden[start:start + chunk])
            if cap:
                logits = torch.tanh(logits / cap) * cap
            yield logits.float().numpy()


def runner_chunks(runner, window: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    """A flatbuffer's logits of a window: prefill signatures chunk after chunk, the KV cache carried over."""
    kv = runner.empty_kv()
    for start in range(0, len(window), chunk):
        logits, kv = runner.prefill_at(window[start:start + chunk], start, kv)
        yield logits


def log_probs(logits: np.ndarray) -> torch.Tensor:
    """Log-softmax of every row in float64, on torch's threads: the one costly step over a 262k vocabulary.
    (`dtype=` casts inside the kernel, the same numbers as `.double()` first without its copy: 24 ms against 41 ms
    for 16 rows, 2026-12-07.)"""
    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits)), dim=-1, dtype=torch.float64)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under the softmax of its row, in float64."""
    return -log_probs(logits)[torch.arange(len(targets)), torch.as_tensor(targets)].numpy()


class _Tally:
    """Per-position NLL, KL against a reference stage and top-1 agreement with it, for one stage."""

    def __init__(self, reference: str | None):
        self.reference = reference
        self.nll: dict[str, list[np.ndarray]] = {}
        self.kl: list[np.ndarray] = []
        self.agree: list[np.ndarray] = []

    def add(self, source: str, logp: torch.Tensor, targets: np.ndarray, reference: torch.Tensor | None) -> None:
        """One block of rows, as log-probabilities (the reference's are computed once for every stage)."""
        self.nll.setdefault(source, []).append(-logp[torch.arange(len(targets)), torch.as_tensor(targets)].numpy())
        if reference is not None:
            # KL(reference || logp) row by row, its product formed in place: the same numbers as
            # (reference.exp() * (reference - logp)).sum(-1), one 33 MB temporary of 16 rows fewer (18 ms, not 31 ms).
            terms = reference - logp
            self.kl.append(terms.mul_(reference.exp()).sum(-1).numpy())
            self.agree.append((logp.argmax(-1) == reference.argmax(-1)).numpy())

    def metrics(self, hf_ppl: float | None) -> dict[str, Any]:
        everything = np.concatenate([np.concatenate(v) for v in self.nll.values()])
        ppl = float(np.exp(everything.mean()))
        out: dict[str, Any] = {"ppl": ppl, "ppl_ratio_vs_hf": ppl / hf_ppl if hf_ppl else 1.0}
        if self.kl:
            kl = np.concatenate(self.kl)
            out.update(mean_kl=float(kl.mean()), p99_kl=float(np.percentile(kl, 99)), max_kl=float(kl.max()),
                       top1=float(np.concatenate(self.agree).mean()), kl_vs=self.reference)
        out["tokens"] = int(everything.size)
        out["ppl_by_document"] = {k: float(np.exp(np.concatenate(v).mean())) for k, v in self.nll.items()}
        return out


def _references(names: list[str]) -> dict[str, str | None]:
    """What each stage is held against on real text: float against HF, a recipe against float."""
    refs: dict[str, str | None] = {}
    for name in names:
        if name == stages.HF:
            refs[name] = None
        elif name == stages.TFLITE_FLOAT:
            refs[name] = stages.HF
        else:
            refs[name] = stages.TFLITE_FLOAT if stages.TFLITE_FLOAT in names else None
    return refs


def reading_passes(names: list[str]) -> list[list[str]]:
    """The stages that read the corpus together: HF and float, then each recipe alone.

    One XNNPack interpreter of the real model holds 1-7 GiB (weight_only_int8 the most) and its signatures'
    buffers ~0.4 GiB each, so at most one is open at a time: a recipe's reference rows are float's logits as the
    first pass wrote them to disk (KeptLogits), and float is read once.
    """
    first = [n for n in names if n in (stages.HF, stages.TFLITE_FLOAT)]
    return [first, *([name] for name in names if name not in first)]


class KeptLogits:
    """One stage's logits over the corpus, piece after piece in a file, as its runner gave them: written by the pass
    that reads the stage and read back, in the same order, by each later pass that holds a stage against it. Over a
    262k vocabulary that is ~5 GB for the corpus, on disk rather than in memory."""

    def __init__(self, path: Path):
        self.path = path
        self.pieces: list[tuple[tuple[int, ...], np.dtype]] = []

    def write(self, piece: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            np.ascontiguousarray(piece).tofile(f)
        self.pieces.append((piece.shape, piece.dtype))

    def read(self) -> Iterator[StoredPiece]:
        offset = 0
        for shape, dtype in self.pieces:
            yield StoredPiece(self.path, offset, shape, dtype)
            offset += int(np.prod(shape)) * dtype.itemsize


class StoredPiece:
    """A piece KeptLogits wrote, read from its file a slice of rows at a time: a reader takes ROWS positions at
    once, and a whole 256-position piece over a 262k vocabulary is 268 MB beside the recipe's runner."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("a stored piece is read in runs of rows")
        row = int(np.prod(self.shape[1:]))
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * row * self.dtype.itemsize)
            return np.fromfile(f, self.dtype, count=max(stop - start, 0) * row).reshape(-1, *self.shape[1:])


def perplexity(pair: ModelPair, hf_model, runners: dict[str, Any], tokenizer, gates,
               documents: dict[str, str] | None = None) -> list[CheckResult]:
    """Perplexity over every window of the corpus for HF and each flatbuffer, KL and top-1 against the reference.

    Each runner is released after the pass that reads it, and HF's model after the first:
    callers pass the model without keeping a reference of their own.
    """
    documents = documents or corpus()
    chunk = max(pair.export.prefill_lens)
    length = pair.export.kv_cache_max // chunk * chunk
    names = [stages.HF, *runners]
    refs = _references(names)
    tallies = {name: _Tally(refs[name]) for name in names}
    passes = reading_passes(names)

    def chunks(name: str, window: np.ndarray) -> Iterator[np.ndarray]:
        return hf_chunks(hf_model, window, chunk) if name == stages.HF else runner_chunks(runners[name], window, chunk)

    def read(group: list[str], kept: dict[str, KeptLogits], keep: set[str]) -> None:
        """One pass over the corpus: the group's stages, and a reference the group lacks from what an earlier pass
        kept; the pieces of `keep` are written for later passes. Its streams (and what they hold) end with it."""
        replayed = {name: logits.read() for name, logits in kept.items() if name not in group}
        for source, text in documents.items():
            for window in windows(encode(tokenizer, text), length):
                streams = [chunks(name, window) for name in group]
                for start, pieces in zip(range(0, len(window), chunk), zip(*streams)):
                    piece_of = {**dict(zip(group, pieces)), **{name: next(it) for name, it in replayed.items()}}
                    for name in keep:
                        kept[name].write(piece_of[name])
                    targets = window[start + 1:start + chunk + 1]
                    for row in range(0, len(targets), ROWS):
                        rows = targets[row:row + ROWS]
                        logp = {name: log_probs(piece[row:row + len(rows)]) for name, piece in piece_of.items()}
                        for name in group:
                            tallies[name].add(source, logp[name], rows, logp[refs[name]] if refs[name] else None)

    with tempfile.TemporaryDirectory(prefix="edge-parity-realtext-", dir=child.scratch()) as tmp:
        kept: dict[str, KeptLogits] = {}
        for i, group in enumerate(passes):
            later = [name for g in passes[i + 1:] for name in g]
            keep = {refs[name] for name in later if refs[name] in group}
            kept.update({name: KeptLogits(Path(tmp) / f"{name}.logits") for name in keep})
            read(group, kept, keep)
            for name in group:
                if name == stages.HF:
                    hf_model = None  # the caller hands it over: ~1 GiB on the real model, read in the first pass only
                else:
                    runners[name].release()
            release_freed()
    results = []
    hf_ppl = None
    for name in names:
        metrics = tallies[name].metrics(hf_ppl)
        hf_ppl = hf_ppl or metrics["ppl"]
        detail = f"over {metrics['tokens']} tokens of {', '.join(documents)}" + (
            f", KL and top-1 vs {refs[name]}" if refs[name] else "")
        results.append(judged(pair.name, name, PERPLEXITY, metrics, gate_for(gates, pair, name, PERPLEXITY), detail))
    return results


def greedy_continuation(runner, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
    """Free-running greedy generation: prefill the prompt, then decode the stage's own argmax."""
    kv = runner.empty_kv()
    logits, kv = runner.prefill(prompt, kv)
    out = [int(logits[-1].argmax())]
    for pos in range(len(prompt), len(prompt) + new_tokens - 1):
        step, kv = runner.decode(out[-1], pos, kv)
        out.append(int(step.argmax()))
    return np.asarray(out, dtype=np.int64)


def greedy_text(pair: ModelPair, runners: dict[str, Any], trajectories, tokenizer, gates) -> list[CheckResult]:
    """Each flatbuffer's own greedy continuation of every prompt, as text, beside HF's."""
    results = []
    for name, runner in runners.items():
        texts, first = [], ""
        for i, traj in enumerate(trajectories):
            ours = greedy_continuation(runner, traj.tokens[:traj.prompt_len], len(traj.greedy))
            hf_text, our_text = tokenizer.decode(traj.greedy), tokenizer.decode(ours)
            texts.append({"hf": hf_text, name: our_text})
            if hf_text != our_text and not first:
                first = f"prompt {i}: HF {hf_text!r} vs {our_text!r}"
        runner.release()
        metrics = {"identical": sum(t["hf"] == t[name] for t in texts) / max(len(texts), 1), "texts": texts}
        # A quantized flatbuffer's own greedy text drifts from HF's by design: reported, not gated, unless
        # the gates file gives it a threshold; the float flatbuffer's must be HF's.
        gate = gate_for(gates, pair, name, GREEDY_TEXT, informational=name != stages.TFLITE_FLOAT)
        results.append(judged(pair.name, name, GREEDY_TEXT, metrics, gate, first))
    return results


def text_eval(state) -> list[CheckResult]:
    """Perplexity and greedy text on real text for HF and every flatbuffer that was built."""
    pair, gates = state.pair, state.options.gates
    tokenizer = load_tokenizer(state.checkpoint)
    runners = {stage: r for stage, r in state.runners.items() if stage.startswith(stages.TFLITE_PREFIX)}
    results = perplexity(pair, load_hf(pair, state.checkpoint), runners, tokenizer, gates)
    return results + greedy_text(pair, runners, state.trajectories, tokenizer, gates)


text_eval.name = REAL_TEXT
