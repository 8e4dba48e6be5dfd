"""The committed gRPC stubs are what scripts/gen_protos.sh makes from proto/ today."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT)
    fresh = tmp_path / "kvmesh" / "v1"
    committed = ROOT / "runtime" / "generated" / "kvmesh" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated, "protoc produced nothing"
    stale = [name for name in generated if not filecmp.cmp(fresh / name, committed / name, shallow=False)]
    assert not stale, f"stale stubs {stale}: run scripts/gen_protos.sh and commit the result"


def test_the_reuse_modes_and_finish_reasons_are_worker_protos_enums_name_for_name():
    """workers/vocabulary.py and worker.proto name the same modes and reasons: one more on either side fails."""
    from kvmesh.runtime.wire import (
        finish_reason_from_wire,
        finish_reason_to_wire,
        reuse_mode_from_wire,
        reuse_mode_to_wire,
    )
    from kvmesh.v1 import worker_pb2
    from kvmesh.workers.vocabulary import BENCHMARK_MODES, FINISH_REASONS, REUSE_MODES, SERVED_MODES, WORKER_MODES

    modes = dict.fromkeys((*WORKER_MODES, *SERVED_MODES))
    assert {reuse_mode_to_wire(mode) for mode in modes} == set(worker_pb2.ReuseMode.values())
    assert [reuse_mode_from_wire(reuse_mode_to_wire(mode)) for mode in modes] == list(modes)
    assert reuse_mode_to_wire("auto") == worker_pb2.REUSE_MODE_UNSPECIFIED  # an unset request asks for auto
    assert reuse_mode_to_wire("kvcomm+blend") == worker_pb2.REUSE_MODE_KVCOMM_BLEND
    assert "naive" in BENCHMARK_MODES and "naive" not in REUSE_MODES  # the worker takes it; users are not offered it
    reasons = ("", *FINISH_REASONS)  # "": not finished
    assert {finish_reason_to_wire(reason) for reason in reasons} == set(worker_pb2.FinishReason.values())
    assert [finish_reason_from_wire(finish_reason_to_wire(reason)) for reason in reasons] == list(reasons)


def test_a_calls_stats_cross_the_wire_whole_field_for_field():
    """CallStats (workers/worker.py) and worker.proto's CallStats have the same fields, and a round trip through
    runtime/wire.py's two conversions gives back what was sent."""
    from dataclasses import fields

    from kvmesh.runtime.wire import call_stats_from_wire, call_stats_to_wire
    from kvmesh.v1 import worker_pb2
    from kvmesh.workers.worker import CallStats

    assert {f.name for f in fields(CallStats)} == set(worker_pb2.CallStats.DESCRIPTOR.fields_by_name)
    modes, reasons = {"s1": "dense", "s2": "kvcomm+blend"}, {"s1": "no anchor fits", "s2": "vouched for"}
    sent = CallStats(40, 16, 8, 16, 2, 0.05, 31.5, 3, 1, "kvcomm+blend", "m", "w:1", 5, modes, reasons, ("down",))
    assert all(getattr(sent, f.name) != f.default for f in fields(CallStats))  # every field set: each one travels
    wire = call_stats_to_wire(sent)
    assert wire.reuse_mode == worker_pb2.REUSE_MODE_KVCOMM_BLEND
    assert call_stats_from_wire(worker_pb2.CallStats.FromString(wire.SerializeToString())) == sent
