"""perf.json is written once from the records; perf.md and perf.png are rendered from that JSON only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.report import write_report

PERF_JSON, PERF_MD, PERF_PNG = "perf.json", "perf.md", "perf.png"
GATE_METHOD = ("Each round runs the candidate and the baseline back to back, each in a fresh process, in alternating "
               "order (ABBA); the ratio is the geometric mean of the per-round candidate/baseline tokens/s with a 95% "
               "Student-t interval on the log ratios. A metric fails only when its whole interval lies below "
               "1 - max_slowdown ([defaults.bench.<metric>] in the gates file).")


def write_perf(out_dir: Path, document: dict[str, Any]) -> list[Path]:
    """perf.json, then perf.md and perf.png rendered from what was written."""
    out_dir = Path(out_dir)
    write_report(out_dir / PERF_JSON, json.dumps(document, indent=1, default=str) + "\n")
    document = json.loads((out_dir / PERF_JSON).read_text())
    paths = [out_dir / PERF_JSON]
    if document.get("measurements"):
        plot_perf(document, out_dir / PERF_PNG)
        paths.append(out_dir / PERF_PNG)
    write_report(out_dir / PERF_MD, render_perf(document, PERF_PNG if len(paths) > 1 else None))
    paths.append(out_dir / PERF_MD)
    return paths


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def measurement_table(document: dict, fmt: str = "github") -> str:
    rows = []
    for m in document["measurements"]:
        ttft = ", ".join(f"{n}: {_f(p['median_ms'])}" for n, p in m["prefill"].items())
        tps = ", ".join(f"{n}: {p['tokens_per_s']:.0f}" for n, p in m["prefill"].items())
        versus = m.get("vs_pytorch") or {}
        rows.append([
            m["model"], m["stage"], m["threads"], _f(m["size_bytes"] / 2**20), _f(m["create_ms"]),
            _f(m["first_decode_ms"]), f"{m['peak_rss_mb']:.0f} (+{m['peak_rss_mb'] - m['rss_before_mb']:.0f})",
            ttft, tps,
            f"{_f(m['decode']['median_ms'])} / {_f(m['decode']['p90_ms'])}", f"{m['decode']['tokens_per_s']:.0f}",
            f"{_f(m['overhead']['decode_ms'])} ({m['overhead']['decode_pct']:.0f}%)",
            f"{m['efficiency']['percent']:.1f}%", _f(versus.get("decode_speedup")),
        ])
    return tabulate(rows, tablefmt=fmt, headers=[
        "model", "stage", "threads", "MiB", "create ms", "1st decode ms", "peak RSS MiB (+model)",
        "TTFT ms by prefill len", "prefill tok/s", "decode ms median / p90", "decode tok/s",
        "binding overhead ms/token", "bandwidth efficiency", "x PyTorch decode"])


ENGINE_NOTE = ("The engine's figures are its benchmark mode's (`litert_lm.Benchmark`: a fresh engine and session "
               "per run, float32 activations, a prompt of as many tokens as the largest prefill signature, then "
               "as many decode steps as the interpreter's or as the context leaves), the median of the runs after "
               "a cold one; its init is the cold run's / the median. The interpreter's time to first token is its "
               "prefill's median latency at that length. Peak RSS is each measuring process's high-water mark "
               "(VmHWM), with the runtime loaded before the model in both (+model: the rise above that). The "
               "bundle's flatbuffer is the float one in the transposed KV layout (the engine's); the "
               "interpreter's is in the default layout.")


def _interpreter_rows(engine: dict, interpreter: dict) -> list[list]:
    """The float flatbuffer's figures at the engine's prefill length: the runtime and the parity runner."""
    n = str(engine["prefill"]["tokens"])
    versus = engine.get("vs_interpreter") or {}
    binding = interpreter["binding"]

    def row(runtime: str, create_ms: float, prefill: dict | None, decode_ms: float, rss: str, ratios: dict) -> list:
        ttft = prefill["median_ms"] if prefill else None
        return [engine["model"], engine["threads"], runtime, _f(create_ms), _f(ttft),
                f"{int(n) / ttft * 1e3:.0f}" if ttft else "", f"{1e3 / decode_ms:.0f}", rss,
                *(_f(ratios.get(k)) for k in ("ttft", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss"))]

    rss = f"{interpreter['peak_rss_mb']:.0f} (+{interpreter['peak_rss_mb'] - interpreter['rss_before_mb']:.0f})"
    return [row("CompiledModel", interpreter["create_ms"], interpreter["prefill"].get(n),
                interpreter["decode"]["median_ms"], rss, versus.get("compiled", {})),
            row("parity runner", binding["create_ms"], binding["prefill"].get(n), binding["decode"]["median_ms"],
                "", versus.get("parity_runner", {}))]


def engine_table(document: dict, fmt: str = "github") -> str:
    """The bundle in the engine, each thread count followed by the float flatbuffer's figures and the ratios."""
    rows = []
    for e in document["engine"]:
        if "error" in e:
            continue
        rows.append([e["model"], e["threads"], "LiteRT-LM engine", f"{_f(e['first_init_ms'])} / {_f(e['init_ms'])}",
                     _f(e["ttft"]["median_ms"]), f"{e['prefill']['tokens_per_s']:.0f}",
                     f"{e['decode']['tokens_per_s']:.0f}",
                     f"{e['peak_rss_mb']:.0f} (+{e['peak_rss_mb'] - e['rss_before_mb']:.0f})", "", "", "", ""])
        interpreter = next((m for m in document["measurements"] if m["model"] == e["model"]
                            and m["recipe"] == e["recipe"] and m["threads"] == e["threads"]), None)
        rows += _interpreter_rows(e, interpreter) if interpreter else []
    return tabulate(rows, tablefmt=fmt, headers=[
        "model", "threads", "runtime", "create / init ms", "TTFT ms", "prefill tok/s", "decode tok/s",
        "peak RSS MiB (+model)", "engine/this TTFT", "engine/this prefill tok/s", "engine/this decode tok/s",
        "engine/this peak RSS"])


def engine_lines(document: dict) -> list[str]:
    engine = document["engine"]
    measured = [e for e in engine if "error" not in e]
    lines = ["## The bundle in the LiteRT-LM engine, beside the float flatbuffer in the interpreter", ""]
    if measured:
        tokens = sorted({(e["prefill"]["tokens"], e["decode"]["tokens"], e["repeats"]) for e in measured})
        lines += [engine_table(document), "",
                  "Prefill / decode tokens, runs: " + ", ".join(f"{p} / {d}, {r}" for p, d, r in tokens) + ". "
                  + ENGINE_NOTE, ""]
    lines += [f"- {e['model']}, {e['threads']} thread(s): ERROR {e['error'][:600]}" for e in engine if "error" in e]
    return lines + ([""] if len(measured) < len(engine) else [])


def delegation_table(document: dict, fmt: str = "github") -> str:
    """One row per artifact and distinct delegation; signatures delegated alike share a row."""
    groups: dict[tuple, list[str]] = {}
    for a in document["artifacts"]:
        for sig, d in a.get("delegation", {}).items():
            if sig == "error":
                row = (a["model"], a["stage"], "", "", "", d[:200])
            else:
                left = ", ".join(f"{k} x{v}" for k, v in d["undelegated"].items())
                row = (a["model"], a["stage"], d["ops"], d["delegated"], d["partitions"], left)
            groups.setdefault(row, []).append(sig)
    rows = [[row[0], row[1], ", ".join(sigs), *row[2:]] for row, sigs in groups.items()]
    return tabulate(rows, tablefmt=fmt, headers=["model", "stage", "signatures", "ops", "delegated to XNNPack",
                                                 "partitions", "not delegated"])


def comparison_table(comparisons: list[dict], fmt: str = "github") -> str:
    rows = [[c["model"], c["stage"], c["threads"], c["metric"], f"{c['ratio']:.3f}",
             f"[{c['low']:.3f}, {c['high']:.3f}]", f"{1 - c['max_slowdown']:.2f}", c["rounds"],
             c["status"].upper() if c["status"] != "pass" else "pass"] for c in comparisons]
    return tabulate(rows, tablefmt=fmt, headers=["model", "stage", "threads", "metric", "candidate/baseline",
                                                 "interval", "fails below", "rounds", "status"])


def self_check_lines(check: dict) -> list[str]:
    lines = [f"## Gate self-check ({check['threads']} thread(s), {check['rounds']} rounds per comparison)", "",
             GATE_METHOD, ""]
    for what, runs, rate in (("false alarms", check["self_comparisons"], check["false_alarm_rate"]),
                             ("detections", check["slow_comparisons"], check["detection_rate"])):
        subject = (f"{check['reference']} against itself" if what == "false alarms"
                   else f"{check['slower']} against {check['reference']}")
        for metric, value in rate.items():
            ratios = [r[metric]["ratio"] for r in runs]
            widths = [r[metric]["high"] - r[metric]["low"] for r in runs]
            lines.append(f"- {what}, {subject}, {metric}: {sum(r[metric]['status'] == 'fail' for r in runs)}"
                         f"/{len(runs)} failed ({value:.0%}); ratios {min(ratios):.3f}..{max(ratios):.3f}, "
                         f"mean interval width {sum(widths) / len(widths):.3f}")
        if runs:
            failed = sum(any(v["status"] == "fail" for v in r.values()) for r in runs)
            lines.append(f"- {what}, {subject}, any metric (what fails the gate): {failed}/{len(runs)} "
                         f"({failed / len(runs):.0%})")
    return lines + [""]


def render_perf(document: dict, plot: str | None = None) -> str:
    run = document["run"]
    host = run.get("host", {})
    lines = [f"# edge-parity performance: {document['verdict'].upper()}", "",
             f"Host: {host.get('cpu')} ({host.get('cores')} cores), load average at start "
             f"{', '.join(f'{x:.2f}' for x in run.get('load_average', []))}. Threads: {run.get('threads')}. "
             f"Gates: `{run.get('gates')}`.", ""]
    if document.get("bandwidth"):
        bw = document["bandwidth"]
        lines += [f"Memory bandwidth (numpy, one thread, {bw['array_bytes'] >> 20} MiB arrays): copy "
                  f"{bw['copy_gbs']:.1f} GB/s (read + write), read {bw['read_gbs']:.1f} GB/s. Bandwidth efficiency = "
                  "(weight bytes + KV cache bytes read per decode token) / decode latency / copy bandwidth; "
                  "above 100% means the weights stay in CPU caches.", ""]
    if document.get("measurements"):
        lines += ["## Runtime (CompiledModel, buffers reused, KV cache never copied)", "",
                  measurement_table(document), "",
                  "Binding overhead: the same calls through the parity stages' runner (`harness.runners.TFLiteRunner`), "
                  "which writes every KV cache in and reads it out per call, minus the runtime figure.", ""]
        if plot:
            lines += [f"![latency]({plot})", ""]
        if document.get("engine"):
            lines += engine_lines(document)
        lines += ["## XNNPack delegation", "", delegation_table(document), "",
                  "Found from the interpreter's nodes after delegation: each DELEGATE node's partition is walked "
                  "back from its outputs to its inputs; nodes in no partition run on LiteRT's own kernels "
                  "(a composite among them runs its decomposition subgraph).", ""]
    if document.get("comparisons"):
        lines += [f"## Gate against baseline `{run.get('baseline')}`", "",
                  comparison_table(document["comparisons"]), "", GATE_METHOD, ""]
    if document.get("self_check"):
        lines += self_check_lines(document["self_check"])
    return "\n".join(lines).rstrip() + "\n"


def plot_perf(document: dict, path: Path) -> Path:
    """Prefill latency against prefill length, and decode tokens/s per thread count."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(dict.fromkeys(f"{m['model']}/{m['stage']}" for m in document["measurements"]))
    threads = sorted({m["threads"] for m in document["measurements"]})
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        rows = [m for m in document["measurements"] if f"{m['model']}/{m['stage']}" == label]
        for m in rows:
            lens = sorted(m["prefill"], key=int)
            left.plot([int(n) for n in lens], [m["prefill"][n]["median_ms"] for n in lens], marker="o",
                      label=f"{label}, {m['threads']}t")
        by_threads = {m["threads"]: m["decode"]["tokens_per_s"] for m in rows}
        right.bar([t_i + i * width for t_i in range(len(threads))], [by_threads.get(t, 0) for t in threads],
                  width, label=label)
    left.set(xlabel="prefill length (tokens)", ylabel="prefill latency, median (ms)", title="Time to first token")
    right.set(xlabel="threads", ylabel="decode tokens/s (median)", title="Decode throughput")
    right.set_xticks([t_i + width * (len(labels) - 1) / 2 for t_i in range(len(threads))], [str(t) for t in threads])
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
