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


def test_an_unknown_kind_is_refused_before_a_process_starts():
    with pytest.raises(ValueError, match="no child handler"):
        child.run("no_such_kind", {})
