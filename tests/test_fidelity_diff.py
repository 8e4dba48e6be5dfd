"""`kvmesh bench fidelity-diff`: two fidelity runs paired item by item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmesh.cli import main


def _run(path: Path, weights: str, outcomes: dict[str, list[bool]]) -> Path:
    """A fidelity --json file whose dense replies are right per `outcomes` (reply text = the outcome)."""
    tasks = {
        shape: {"item_results": [
            {"id": f"{shape}-{i:03d}", "modes": {"dense": {"correct": right, "reply": "yes" if right else "no"}}}
            for i, right in enumerate(rights)
        ]}
        for shape, rights in outcomes.items()
    }  # fmt: skip
    path.write_text(json.dumps({"model": {"name": "smollm2", "weights": weights, "device": "cpu"}, "tasks": tasks}))
    return path


def test_pairs_items_and_reports_the_difference_with_its_interval(tmp_path: Path, capsys) -> None:
    a = _run(tmp_path / "a.json", "fp32", {"relay": [True] * 10 + [False] * 10, "critique": [True, False] * 5})
    # B loses 5 relay items A had and matches A on critique
    b = _run(tmp_path / "b.json", "int4", {"relay": [True] * 5 + [False] * 15, "critique": [True, False] * 5})
    out = tmp_path / "diff.json"
    assert main(["bench", "fidelity-diff", str(a), str(b), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    relay, critique, pooled = result["shapes"]["relay"], result["shapes"]["critique"], result["pooled"]
    assert (relay["items"], relay["accuracy_a"], relay["accuracy_b"], relay["delta"]) == (20, 0.5, 0.25, -0.25)
    assert relay["delta_ci95"][1] < 0  # five losses, no gain
    assert relay["mcnemar_p"] == pytest.approx(2 / 2**5)  # both tails of 5 disagreements all one way
    assert relay["same_reply"] == 0.75
    assert critique["delta"] == 0 and critique["delta_ci95"] == [0.0, 0.0] and critique["same_reply"] == 1
    assert pooled["items"] == 30 and pooled["delta"] == pytest.approx(-5 / 30)
    assert "int4" in capsys.readouterr().out


def test_rejects_a_file_that_is_not_a_fidelity_run_and_runs_without_shared_items(tmp_path: Path) -> None:
    a = _run(tmp_path / "a.json", "fp32", {"relay": [True]})
    bad = tmp_path / "bad.json"
    bad.write_text('{"tasks": {"relay": {}}}')
    with pytest.raises(SystemExit, match="not a `kvmesh bench fidelity --json` file"):
        main(["bench", "fidelity-diff", str(a), str(bad)])
    other = _run(tmp_path / "other.json", "int4", {"retrieval": [True]})
    with pytest.raises(SystemExit, match="share no items"):
        main(["bench", "fidelity-diff", str(a), str(other)])
