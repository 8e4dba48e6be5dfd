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
