"""The child protocol, both ends, with real child processes."""

import os

import pytest

from harness import child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PYTHONPATH": ROOT}  # the child imports tests.child_jobs


def test_a_job_returns_its_result_and_its_events_arrive_in_order():
    events = []
    result = child.run("tests.child_jobs:echo", {"value": [1, "two"], "events": 3}, on_event=events.append, env=ENV)
    assert result == {"echo": [1, "two"]}
    assert events == [{"step": 0}, {"step": 1}, {"step": 2}]


def test_a_failing_job_raises_with_its_exit_code_and_last_output():
    with pytest.raises(child.ChildFailed) as failed:
        child.run("tests.child_jobs:raises", {}, env=ENV)
    assert failed.value.code != 0 and failed.value.partial is None
    assert "injected: the job failed" in str(failed.value)


def test_a_child_that_dies_keeps_what_it_saved():
    with pytest.raises(child.ChildFailed) as failed:
        child.run("tests.child_jobs:dies_after_saving", {}, env=ENV)
    assert failed.value.code == 9
    assert failed.value.partial == {"done": ["first stage"]}
    assert "last words" in failed.value.tail


def test_a_killed_childs_temporary_files_are_removed_with_it():
    events = []
    with pytest.raises(child.ChildFailed) as failed:
        child.run("tests.child_jobs:dies_holding_a_temporary_file", {}, on_event=events.append, env=ENV)
    assert failed.value.code == -9
    assert "edge-parity-child-" in events[0]["directory"] and not os.path.exists(events[0]["directory"])
    assert child.scratch() is None  # outside a child: the system's temporary directory


@pytest.mark.parametrize("forked", [False, True])
def test_a_child_runs_its_exit_functions_and_leaves_no_library_files_behind(tmp_path, forked, forking):
    """A child ends with os._exit (no teardown of torch and TensorFlow), but first runs the exit functions its job
    registered: TensorFlow's autograph removes the code it generated in the system's temporary directory with one
    (five files a pair's run once left in /tmp), in a fresh child and in a forked one."""
    result = child.run("tests.child_jobs:traces_a_tf_function", {"tmp": str(tmp_path)}, forked=forked,
                       env=None if forked else ENV)
    assert result["value"] == 3.0 and any(n.startswith("__autograph_generated_file") for n in result["written"])
    assert os.listdir(tmp_path) == []


def test_an_unknown_kind_is_refused_before_a_process_starts():
    with pytest.raises(ValueError, match="no child handler"):
        child.run("no_such_kind", {})


@pytest.fixture(scope="module")
def forking():
    """One fork server for these tests (it imports torch, TensorFlow and litert-torch once: ~8 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", ROOT)  # the server, and so each forked child, imports tests.child_jobs
        with child.forking():
            yield child._server


def test_forked_jobs_come_from_one_server_each_in_a_process_of_its_own(forking):
    events = []
    first = child.run("tests.child_jobs:whoami", {}, on_event=events.append, forked=True)
    second = child.run("tests.child_jobs:whoami", {}, forked=True)
    assert first["ppid"] == second["ppid"] == forking._proc.pid != os.getpid()
    assert first["pid"] != second["pid"] and events == [{"step": 0}]
    fresh = child.run("tests.child_jobs:whoami", {}, forked=False)  # not asked: a fresh interpreter, as before
    assert fresh["ppid"] == os.getpid()
    own_env = child.run("tests.child_jobs:whoami", {}, env=ENV, forked=True)  # only a fresh process honours env
    assert own_env["ppid"] == os.getpid()


def test_a_forked_child_that_dies_keeps_what_it_saved_and_the_server_goes_on(forking):
    with pytest.raises(child.ChildFailed) as failed:
        child.run("tests.child_jobs:dies_after_saving", {}, forked=True)
    assert failed.value.code == 9 and failed.value.partial == {"done": ["first stage"]}
    assert "last words" in failed.value.tail
    with pytest.raises(child.ChildFailed) as crashed:
        child.run("tests.child_jobs:segfaults", {}, forked=True)
    assert crashed.value.code == -11 and crashed.value.partial == {"done": ["before the crash"]}
    assert _crashed_in_segfaults(crashed.value)
    events = []
    with pytest.raises(child.ChildFailed):
        child.run("tests.child_jobs:dies_holding_a_temporary_file", {}, on_event=events.append, forked=True)
    assert events and not os.path.exists(events[0]["directory"])
    assert child.run("tests.child_jobs:echo", {"value": 1, "events": 0}, forked=True) == {"echo": 1}


def _crashed_in_segfaults(failure: child.ChildFailed) -> bool:
    """The failure says where the child crashed: faulthandler's first line, then the job's frame first."""
    first, thread, innermost = failure.stack[:3]
    return (first.startswith("Fatal Python error: Segmentation fault") and thread.startswith("Current thread")
            and 'child_jobs.py", line' in innermost and innermost.endswith(" in segfaults")
            and str(failure).startswith("tests.child_jobs:segfaults child exited with -11: Fatal Python error"))


def test_a_child_that_crashes_in_native_code_says_where():
    with pytest.raises(child.ChildFailed) as crashed:
        child.run("tests.child_jobs:segfaults", {}, env=ENV)
    assert crashed.value.code == -11 and _crashed_in_segfaults(crashed.value)


def test_the_crashing_threads_stack_is_taken_from_faulthandlers_report():
    output = ["some progress", "Fatal Python error: Segmentation fault", "",
              "Thread 0x01 (most recent call first):", '  File "a.py", line 1 in waits', "",
              "Current thread 0x02 (most recent call first):", '  File "b.py", line 7 in crashes',
              '  File "b.py", line 9 in <module>', "", "Extension modules: numpy (total: 1)"]
    assert child.native_stack(output) == ["Fatal Python error: Segmentation fault",
                                          "Current thread 0x02 (most recent call first):",
                                          '  File "b.py", line 7 in crashes', '  File "b.py", line 9 in <module>']
    alone = ["Fatal Python error: Aborted", "", "Thread 0x03 (most recent call first):", '  File "c.py", line 2 in f']
    assert child.native_stack(alone) == [alone[0], alone[2], alone[3]]
    assert child.native_stack(["Traceback (most recent call last):", "RuntimeError: no crash"]) == []


def test_a_failing_forked_job_reports_its_traceback(forking):
    with pytest.raises(child.ChildFailed) as failed:
        child.run("tests.child_jobs:raises", {}, forked=True)
    assert failed.value.code != 0 and "injected: the job failed" in str(failed.value)


def test_a_server_that_died_is_replaced(forking):
    forking._proc.kill()
    forking._proc.wait()
    assert child.run("tests.child_jobs:echo", {"value": 2, "events": 0}, forked=True) == {"echo": 2}
    assert forking._proc.poll() is None
