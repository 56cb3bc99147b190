"""`harness affected`: which pairs a change touches, on a small git repository shaped like this one."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import cli
from harness.affected import affected, changed_files
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ["phi2", "smollm2", "tiny_llama"]
GATES = """# tolerances
[defaults.reauthored.logits]
max_max_abs_err = 1e-4

[models.phi2.reauthored.logits]
max_max_abs_err = 2e-4
"""


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"})


@pytest.fixture
def repo(tmp_path):
    """A repository with the layout affected() reads; branch `base` is the PR's base."""
    for path, text in {"harness/gates.toml": GATES, "harness/report.py": "X = 1\n", "README.md": "# r\n",
                       "pyproject.toml": "[project]\n", "noxfile.py": "", "tests/test_x.py": "",
                       "golden/phi2.json": "{}\n", "golden/smollm2.json": "{}\n", "models/_defects.py": "",
                       "models/phi2.py": "PAIR = None\n", ".github/workflows/parity.yml": "on: push\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    shutil.copy(ROOT / "models" / "smollm2.py", tmp_path / "models" / "smollm2_file.py")  # declares "smollm2"
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "base")
    git(tmp_path, "branch", "base")
    return tmp_path


def change(repo, path, text, commit=True):
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)
    if commit:
        git(repo, "add", ".")
        git(repo, "commit", "-q", "-m", f"change {path}")


EVERY = set(KNOWN)


@pytest.mark.parametrize("path, text, expected", [
    ("models/smollm2_file.py", (ROOT / "models" / "smollm2.py").read_text() + "\n# edited\n", {"smollm2"}),
    ("models/phi2.py", "PAIR = None  # expected_failures moved\n", {"phi2"}),  # a broken file: its stem
    ("golden/smollm2.json", '{"moved": 1}\n', {"smollm2"}),
    ("harness/gates.toml", GATES.replace("2e-4", "3e-4"), {"phi2"}),
    ("harness/gates.toml", GATES + "[models.tiny_llama.reauthored.greedy]\nmin_match = 0.5\n", {"tiny_llama"}),
    ("harness/gates.toml", GATES.replace("# tolerances", "# tolerances, re-worded"), set()),
    ("harness/gates.toml", GATES.replace("1e-4", "5e-5"), EVERY),
    ("harness/report.py", "X = 2\n", EVERY),
    ("pyproject.toml", "[project]\ndependencies = ['torch==9']\n", EVERY),
    ("noxfile.py", "# new session\n", EVERY),
    ("models/_defects.py", "BAND = 1\n", EVERY),
    ("README.md", "# docs only\n", set()),
    ("tests/test_x.py", "def test(): pass\n", set()),
    (".github/workflows/parity.yml", "on: pull_request\n", set()),
])
def test_a_change_touches_the_pairs_it_should(repo, path, text, expected):
    change(repo, path, text)
    touched = affected("base", KNOWN, repo)
    assert set(touched) == expected
    for reasons in touched.values():
        assert any(path in reason or "gates" in reason for reason in reasons), reasons


def test_uncommitted_and_untracked_changes_count(repo):
    change(repo, "golden/phi2.json", '{"moved": 1}\n', commit=False)
    change(repo, "golden/tiny_llama.json", "{}\n", commit=False)  # a new, untracked golden
    assert changed_files("base", repo) == ["golden/phi2.json", "golden/tiny_llama.json"]
    assert set(affected("base", KNOWN, repo)) == {"phi2", "tiny_llama"}


def test_only_changes_since_the_merge_base_count(repo):
    """A commit on the base branch after the PR branched (an edit to every pair's code) touches nothing."""
    git(repo, "checkout", "-q", "base")
    change(repo, "harness/report.py", "X = 3\n")
    git(repo, "checkout", "-q", "main")
    change(repo, "golden/phi2.json", '{"moved": 1}\n')
    assert set(affected("base", KNOWN, repo)) == {"phi2"}


def test_a_ref_that_is_no_commit_is_a_one_line_error(repo):
    with pytest.raises(HarnessError, match="pass a --base that names a commit"):
        affected("no-such-branch", KNOWN, repo)


def test_the_command_prints_each_pair_with_its_reason(capsys):
    """On this repository: against HEAD, whatever is uncommitted decides; the JSON form is what CI reads."""
    assert cli.main(["affected", "--base", "HEAD", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["base"] == "HEAD" and list(out["reasons"]) == out["pairs"]
    assert cli.main(["affected", "--base", "no-such-ref"]) == 2
    assert "no-such-ref" in capsys.readouterr().err


def test_changed_since_runs_the_touched_pairs_then_shards_them_and_records_the_rest(monkeypatch):
    from harness import affected as affected_module
    from harness.config import RunConfig
    from harness.pairs import discover
    from harness.suite import narrow

    pairs = [p for p in discover().values() if "default" in p.suites]
    monkeypatch.setattr(affected_module, "affected",
                        lambda base, known: {n: [f"its golden (golden/{n}.json)"] for n in known if n in ("phi2", "qwen3")})
    kept, note = narrow(RunConfig(changed_since="origin/main", shard="2/2"), pairs)
    assert note["changed_since"]["skipped"] == [p.name for p in pairs if p.name not in ("phi2", "qwen3")]
    assert list(note["changed_since"]["affected"]) == ["phi2", "qwen3"]
    assert note["shard"] == "2/2" and note["shard_of"] == ["phi2", "qwen3"]
    assert [p.name for p in kept] == ["phi2"]  # qwen3 (32.7 s) leads shard 1, phi2 (24.9 s) takes shard 2
    assert any("skipped 8 pair(s)" in line for line in note["said"])


def test_a_touched_pair_outside_the_runs_suite_is_named_as_not_verified(monkeypatch):
    """A default run after a harness change verifies the tiny pairs and says, in its notes, console and
    summary, that the real model (suite full) was touched and not verified; a full run verifies it."""
    from harness import affected as affected_module
    from harness.config import RunConfig
    from harness.pairs import discover
    from harness.suite import narrow
    from harness.summary import run_lines

    registry = discover()
    monkeypatch.setattr(affected_module, "affected",
                        lambda base, known: {n: ["harness code (harness/report.py)"] for n in known})
    tiny = [p for p in registry.values() if "default" in p.suites]
    kept, note = narrow(RunConfig(changed_since="origin/main"), tiny, registry)
    assert kept == tiny and list(note["changed_since"]["not_in_suite"]) == ["gemma3_270m_real"]
    assert any(line.startswith("gemma3_270m_real: NOT VERIFIED by this run") for line in note["said"])
    assert any("**Not verified by this run: gemma3_270m_real**" in line
               for line in run_lines({"run": {"changed_since": note["changed_since"]}}))
    full = [p for p in registry.values() if "full" in p.suites]
    kept, note = narrow(RunConfig(changed_since="origin/main", suite="full"), full, registry)
    assert "gemma3_270m_real" in [p.name for p in kept] and note["changed_since"]["not_in_suite"] == {}
