"""The benches' settling rule: measure in blocks until two in a row agree, and say how far apart they were."""

from __future__ import annotations

import pytest

from kvmesh.bench.bench_common import settle


def test_it_stops_at_the_first_two_blocks_that_agree_and_reports_their_spread():
    blocks = iter([50.0, 40.0, 38.0, 37.0])  # a cold first block, then the machine settles
    settled = settle(lambda: next(blocks), tolerance=0.06)
    assert (settled.value, settled.blocks) == (38.0, 3)
    assert settled.spread == pytest.approx(2.0 / 39.0)  # (max - min) / median of 40 and 38


def test_a_figure_that_never_settles_is_reported_with_its_spread_after_the_last_block():
    blocks = iter([10.0, 20.0, 10.0, 20.0, 10.0])
    settled = settle(lambda: next(blocks), max_blocks=4)
    assert (settled.value, settled.blocks) == (20.0, 4) and settled.spread == pytest.approx(10.0 / 15.0)


@pytest.mark.parametrize(("tolerance", "max_blocks"), [(0.0, 4), (1.0, 4), (0.05, 1)])
def test_bad_settings_are_refused(tolerance, max_blocks):
    with pytest.raises(ValueError, match="settle needs"):
        settle(lambda: 1.0, tolerance=tolerance, max_blocks=max_blocks)
