"""KVCOMM through the real runtime: Ray actors, gRPC, the session's embedded Redis, the real model."""

from __future__ import annotations

import pytest

from kvmesh import Agent, Pipeline
from kvmesh.runtime import RuntimeConfig, Session

pytestmark = pytest.mark.slow

QUERY = "I am planning a trip to Norway. What is the capital city of Norway?"


@pytest.fixture(scope="module")
def session(ray_cluster):
    """Its own session: these tests stop its Redis."""
    with Session(workers=1, config=RuntimeConfig(redis_url=None)) as session:
        yield session


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline(
        "travel",
        [
            Agent(
                "researcher",
                "Write one sentence about the country in this request.\n\n{query}",
                max_tokens=20,
                reuse="kvcomm",
            ),
            Agent(
                "answerer",
                "Request: {query}\n\nNotes:\n{researcher}\n\nAnswer in one sentence.",
                max_tokens=12,
                reuse="kvcomm",
            ),
        ],
    )


def test_a_session_starts_its_own_redis_and_calls_reuse_other_agents_kv_once_anchors_exist(session, pipeline):
    assert session.redis is not None and session.config.redis_url == session.redis.url
    runs = [session.run(pipeline, QUERY) for _ in range(3)]
    modes = [{c.agent: c.stats.reuse_mode for c in run.calls} for run in runs]
    assert set(modes[0].values()) <= {"prefix", "dense"}  # no anchors yet: plain prefills, recorded as anchors
    answerer = next(c.stats for c in runs[2].calls if c.agent == "answerer")
    assert answerer.reuse_mode == "kvcomm" and answerer.reused_tokens > 0, modes
    assert answerer.anchors_consulted >= 4 and set(answerer.segment_modes.values()) == {"kvcomm"}
    assert len(answerer.segment_modes) == 2  # the query and the researcher's notes
    assert answerer.segment_reasons.keys() == answerer.segment_modes.keys()  # the why travels with the what
    assert all(why.startswith("vouched for by") for why in answerer.segment_reasons.values())
    first = next(c.stats for c in runs[0].calls if c.agent == "answerer")
    assert all("0 anchors" in why for why in first.segment_reasons.values()), first.segment_reasons
    # the same segments in the same slots: the anchors' deviations restore the dense KV, so the reply is the same
    assert runs[2].outputs == runs[0].outputs


def test_losing_redis_mid_session_falls_back_to_dense_with_correct_outputs(session, pipeline):
    reference = session.run(pipeline, QUERY).outputs
    session.redis.stop()
    result = session.run(pipeline, QUERY)
    assert result.outputs == reference
    calls = [c.stats for c in result.calls]
    assert all(c.reuse_mode in ("prefix", "dense") and c.reused_tokens == 0 for c in calls)
    for call in calls:  # the caller hears of it, call by call (the CLI says it once)
        assert any(line.startswith("KV store unavailable") for line in call.degradations), call.degradations
        assert "***" in call.degradations[0] and session.redis.url not in call.degradations[0]  # no password
