"""The router: segments first, then the agent's previous worker, then the least loaded; load can overrule.
And the registry's bookkeeping that feeds it."""

from __future__ import annotations

import pytest

from kvmesh.runtime.registry import Registry
from kvmesh.runtime.router import WorkerLoad, choose_worker


def loads(**in_flight: int) -> list[WorkerLoad]:
    return [WorkerLoad(name, n) for name, n in in_flight.items()]


def test_the_worker_holding_most_segments_wins_over_the_previous_and_the_idle_one():
    workers = loads(w0=1, w1=2, w2=0)
    assert choose_worker(workers, ["w1", "w1", "w0"], previous="w0") == "w1"


def test_a_tie_on_segments_goes_to_the_previous_worker_then_to_the_less_loaded():
    workers = loads(w0=2, w1=0)
    assert choose_worker(workers, ["w0", "w1"], previous="w0") == "w0"
    assert choose_worker(workers, ["w0", "w1"], previous=None) == "w1"


def test_without_known_segments_the_previous_worker_keeps_the_agent():
    assert choose_worker(loads(w0=0, w1=3), [None, None], previous="w1") == "w1"


def test_a_first_call_goes_to_the_least_loaded_and_ties_break_by_name():
    assert choose_worker(loads(w1=1, w0=1, w2=0), [], previous=None) == "w2"
    assert choose_worker(loads(w1=0, w0=0), [], previous=None) == "w0"


def test_affinity_yields_to_load_when_the_preferred_worker_is_far_busier():
    workers = loads(w0=5, w1=0)
    assert choose_worker(workers, ["w0"], previous="w0", imbalance=4) == "w1"
    assert choose_worker(workers, ["w0"], previous="w0", imbalance=6) == "w0"
    assert choose_worker(loads(w0=4, w1=1), [], previous="w0", imbalance=4) == "w0"  # 3 beyond: still balanced


def test_holders_and_previous_workers_that_are_gone_are_ignored():
    assert choose_worker(loads(w1=2, w2=1), ["w9", "w9"], previous="w9") == "w2"


def test_no_workers_or_a_bad_threshold_is_an_error():
    with pytest.raises(ValueError, match="no workers"):
        choose_worker([], [], None)
    with pytest.raises(ValueError, match="imbalance"):
        choose_worker(loads(w0=0), [], None, imbalance=0)


# -- the registry's bookkeeping that feeds the router (a plain object here; a Ray actor in a session) ------
def two_workers() -> Registry:
    registry = Registry()
    registry.register_worker("w0", "127.0.0.1:1000", "smollm2", None)
    registry.register_worker("w1", "127.0.0.1:1001", "smollm2", None)
    return registry


def test_an_agent_returns_to_its_worker_and_a_reader_follows_the_segment_it_reads():
    registry = two_workers()
    registry.route("g/other", [])  # w0 is busy with another agent's call
    first = registry.route("g/writer", ["query:abc"])
    assert first.worker == "w1"
    registry.finished("g/writer", "w1", "writer:123")
    assert registry.route("g/writer", []).worker == "w1"  # its prefix is cached there
    registry.finished("g/writer", "w1", "writer:456")
    reader = registry.route("g/reader", ["query:abc", "writer:456"])
    assert reader.worker == "w1" and reader.holders == {"writer:456": "127.0.0.1:1001"}


def test_a_restarted_worker_holds_nothing_and_a_removed_one_gets_nothing():
    registry = two_workers()
    registry.route("g/writer", [])
    registry.finished("g/writer", "w0", "writer:1")
    registry.register_worker("w0", "127.0.0.1:2000", "smollm2", None)  # Ray restarted it: a new port
    assert registry.route("g/reader", ["writer:1"]).holders == {}
    assert registry.worker("w0").registrations == 2
    registry.remove_worker("w0")
    registry.remove_worker("w1")
    assert registry.route("g/reader", []) is None
