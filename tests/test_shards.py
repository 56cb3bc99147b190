"""--shard I/N and `report merge`: a split run, merged, is the run one machine would have made."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import report, shards
from harness.config import RunConfig
from harness.errors import HarnessError
from harness.records import CheckResult
from tests.scripts import harness_here

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = json.loads((ROOT / "reports" / "sample" / "parity.json").read_text())


def harness(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=timeout)


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/b", "2", "-1/2"])
def test_a_shard_outside_1_to_n_is_a_usage_error(text):
    with pytest.raises(HarnessError, match="1 <= I <= N"):
        RunConfig(shard=text).validate()


def test_the_split_is_deterministic_balanced_and_covers_every_pair_once():
    costs = shards.pair_costs()
    names = list(SAMPLE["models"])  # the ten pairs of the default suite
    for count in (1, 2, 3, 4):
        split = shards.assign(names, count, costs)
        assert sorted(n for share in split for n in share) == sorted(names)
        assert shards.assign(list(reversed(names)), count, costs) == [sorted(s, key=names[::-1].index)
                                                                       for s in split]
        totals = [sum(costs[n] for n in share) for share in split]
        assert max(totals) - min(totals) <= max(costs[n] for n in names)  # greedy longest-first's bound
    # The real model alone outweighs the tiny ones: with two shards it gets one to itself.
    assert shards.assign([*names, "gemma3_270m_real"], 2, costs)[0] == ["gemma3_270m_real"]


def split_document(document, parts):
    """The sample run as if each group of pairs had been a shard of its own."""
    out = []
    for number, group in enumerate(parts, 1):
        doc = copy.deepcopy(document)
        doc["run"]["shard"] = f"{number}/{len(parts)}"
        doc["models"] = {m: v for m, v in doc["models"].items() if m in group}
        doc["results"] = [r for r in doc["results"] if r["model"] in group]
        out.append(doc)
    return out


def test_merge_gives_the_unsharded_records_in_any_order():
    names = list(SAMPLE["models"])
    parts = shards.assign(names, 3, shards.pair_costs())
    pieces = split_document(SAMPLE, parts)
    merged = shards.merge(pieces, names)
    assert merged["results"] == SAMPLE["results"]
    assert merged["models"] == SAMPLE["models"]
    assert shards.merge(pieces[::-1], names) == merged == shards.merge([pieces[1], pieces[2], pieces[0]], names)
    assert [s["shard"] for s in merged["run"]["shards"]] == ["1/3", "2/3", "3/3"]
    assert report.render_summary(merged) == report.render_summary(shards.merge(pieces[::-1], names))


@pytest.mark.parametrize("key, value, fragment", [
    ("versions", {"torch": "0.0"}, "library versions"),
    ("gates_sha256", "0" * 64, "gates"),
    ("harness", {"commit": "f" * 40, "dirty": False}, "harness commit"),
])
def test_merge_refuses_shards_of_different_runs(key, value, fragment):
    first, second = split_document(SAMPLE, [["gemma2"], ["phi2"]])
    second["run"][key] = value
    with pytest.raises(HarnessError, match=f"shards differ in their {fragment}"):
        shards.merge([first, second])


def test_merge_refuses_a_pair_in_two_shards():
    first, second = split_document(SAMPLE, [["gemma2", "phi2"], ["phi2"]])
    with pytest.raises(HarnessError, match="pair phi2 is in two shards"):
        shards.merge([first, second])


def test_a_merged_interrupted_shard_never_reads_pass():
    first, second = split_document(SAMPLE, [["gemma2"], ["phi2"]])
    second["run"]["status"] = "interrupted"
    second["results"].append(CheckResult("phi2", "hf", "stage_run", "not_run", message="stopped").to_json())
    assert report.overall(shards.merge([first, second])) == "interrupted"


def test_two_shards_merged_equal_the_unsharded_run(tmp_path):
    """Real runs (hf and reauthored of two pairs): the merged records are the single run's, bit for bit."""
    common = ["verify", "--models", "tiny_llama,smollm2", "--stages", "hf,reauthored", "--in-process"]
    whole = harness_here(*common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]
    for index in (1, 2):
        part = harness_here(*common, "--shard", f"{index}/2", "--out", str(tmp_path / f"s{index}"))
        assert part.returncode == 0, part.stderr[-2000:]
        assert f"shard {index}/2:" in part.stdout
    merged = harness("report", "merge", str(tmp_path / "s2"), str(tmp_path / "s1"), "--out", str(tmp_path / "m"),
                     "--junit", str(tmp_path / "m" / "junit.xml"))
    assert merged.returncode == 0, merged.stderr
    docs = {name: json.loads((tmp_path / name / "parity.json").read_text()) for name in ("whole", "s1", "s2", "m")}
    assert [d["run"]["shard"] for d in (docs["s1"], docs["s2"])] == ["1/2", "2/2"]
    assert {len(d["models"]) for d in (docs["s1"], docs["s2"])} == {1}
    assert docs["m"]["results"] == docs["whole"]["results"]
    assert (tmp_path / "m" / "summary.md").read_text().startswith("# edge-parity: PASS")
    assert (tmp_path / "m" / "junit.xml").is_file()
    bad = harness("verify", "--models", "tiny_llama", "--shard", "3/2", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "--shard '3/2'" in bad.stderr
