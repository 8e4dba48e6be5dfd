"""What the user sees when actors die mid-run: a worker Ray restarts (the call is retried once), a worker
that stays dead (the error names it), an agent actor that dies (the error names the agent)."""

from __future__ import annotations

import pytest
import ray

from kvmesh import Agent, Pipeline
from kvmesh.runtime import AgentError, RunFinished, Session
from kvmesh.runtime.errors import AgentDiedError
from kvmesh.runtime.events import AgentFinished, Retried, Token

pytestmark = pytest.mark.slow

# Long enough to be mid-call when the first token reaches the driver. Each kill uses a query the worker has
# not seen: its suffix-tree speculation would otherwise draft a repeated story whole and finish at once.
STORY = Pipeline("story", [Agent("teller", "Tell a long story about {query}.", max_tokens=64)])


@pytest.fixture(scope="module")
def own_worker_session(ray_cluster):
    """A session with its own worker: these tests kill it."""
    session = Session(workers=1)
    yield session
    session.close()


def kill_at_first_token(session: Session, pipeline: Pipeline, query: str, kill) -> list:
    events = []
    killed = False
    for event in session.stream(pipeline, query):
        events.append(event)
        if isinstance(event, Token) and not killed:
            kill()
            killed = True
    return events


def test_a_killed_worker_is_restarted_and_the_call_retried_once_then_a_second_death_is_named(own_worker_session):
    session = own_worker_session
    worker = session.workers["worker-0"]
    first_pid = ray.get(worker.pid.remote())

    events = kill_at_first_token(session, STORY, "a dragon", lambda: ray.kill(worker, no_restart=False))
    retried = [e for e in events if isinstance(e, Retried)]
    assert len(retried) == 1 and retried[0].agent == "teller" and "worker-0" in retried[0].reason
    (done,) = [e for e in events if isinstance(e, AgentFinished)]
    assert done.record.attempts == 2 and isinstance(events[-1], RunFinished)
    reference = session.run(STORY, "a dragon").outputs["teller"]
    assert done.text == reference  # greedy: the retried call gives the same text as an undisturbed one
    tokens_after_retry = "".join(e.text for e in events[events.index(retried[0]) :] if isinstance(e, Token))
    assert tokens_after_retry == reference  # what streamed after the Retried event is the whole output
    assert ray.get(worker.pid.remote()) != first_pid  # a new process, Ray's restart

    # max_restarts=1 is spent: a second death is final, and the error names the agent and the worker
    with pytest.raises(AgentError) as failed:
        kill_at_first_token(session, STORY, "a lighthouse keeper", lambda: ray.kill(worker, no_restart=False))
    message = str(failed.value)
    assert failed.value.agent == "teller"
    assert "worker 'worker-0' died and was not restarted" in message
    assert ray.get(session.registry.workers.remote()) == []  # nothing more is routed to it


def test_a_killed_agent_actor_fails_the_run_naming_the_agent_and_the_next_run_starts_fresh(runtime_session):
    pipeline = Pipeline(
        "relay",
        [
            Agent("first", "Tell a long story about {query}.", max_tokens=96),
            Agent("second", "Shorten: {first}", max_tokens=4),
        ],
    )
    victim = runtime_session.agent_actors(pipeline)["first"]
    with pytest.raises(AgentDiedError) as failed:
        kill_at_first_token(runtime_session, pipeline, "a clockmaker", lambda: ray.kill(victim, no_restart=True))
    assert failed.value.agent == "first" and "stopped answering" in str(failed.value)
    result = runtime_session.run(pipeline, "a cat")  # the same pipeline: a fresh set of agent actors
    assert set(result.outputs) == {"second"} and result.outputs["second"]
    assert runtime_session.agent_actors(pipeline)["first"] != victim
