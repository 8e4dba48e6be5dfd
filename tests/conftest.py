"""Shared fixtures: the real SmolLM2-135M (loaded once per session) and a seeded tiny random Llama."""

from __future__ import annotations

import os

# Tests share 2 cores with Ray, servers and subprocesses: spinning OpenMP threads would starve them
# (a 6 s benchmark took 71 s beside a busy process). Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from tiny_model import random_llama_weights, tiny_config

from kvmesh.workers.llama import LlamaModel
from kvmesh.workers.model_files import RawModel, load_raw_model


@pytest.fixture(scope="session")
def raw_model() -> RawModel:
    """SmolLM2-135M through our GGUF loader (from the user's weight cache after the first run)."""
    return load_raw_model()


@pytest.fixture(scope="session")
def model(raw_model: RawModel) -> LlamaModel:
    return LlamaModel(raw_model.config, raw_model.weights)


@pytest.fixture(scope="session")
def tokenizer(raw_model: RawModel):
    return raw_model.tokenizer


@pytest.fixture(scope="session")
def tiny_model() -> LlamaModel:
    """2 layers, hidden 64, 4 query heads over 2 KV heads (GQA), head_dim 16, vocab 256, untied head."""
    config = tiny_config()
    return LlamaModel(config, random_llama_weights(config, seed=0))


# -- the distributed runtime: one Ray cluster and one worker for the whole test session -------------------


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded Ray cluster (started once; ~5 s), shut down after the last test."""
    from kvmesh.runtime.cluster import connect, shutdown

    info = connect()
    yield info
    shutdown()


@pytest.fixture(scope="session")
def runtime_session(ray_cluster):
    """A Session with one SmolLM2 worker, as configured by default: its servers require the token it generated
    (so every run exercises it), its agents take START only from its driver."""
    from kvmesh.runtime import Session

    session = Session(workers=1)
    yield session
    session.close()
