"""`kvmesh bench blend`'s compute bound on the speedup, for one check and for a schedule."""

from __future__ import annotations

import pytest

from kvmesh.bench.blend_bench import _speedup_bound
from kvmesh.workers.blend import BlendConfig


def test_the_bound_counts_layer_0_in_full_and_each_layer_at_the_share_its_last_check_kept():
    assert _speedup_bound(BlendConfig(share=1.0), 30) == pytest.approx(1.0)
    assert _speedup_bound(BlendConfig(share=0.15), 30) == pytest.approx(30 / (1 + 29 * 0.15))
    # every row through layers 0-9, then 15%: a deep check is paid for with the layers before it
    assert _speedup_bound(BlendConfig(share=0.15, schedule=((10, 0.15),)), 30) == pytest.approx(30 / (10 + 20 * 0.15))
    narrowing = BlendConfig(share=0.15, schedule=((1, 0.3), (3, 0.15)))
    assert _speedup_bound(narrowing, 30) == pytest.approx(30 / (1 + 2 * 0.3 + 27 * 0.15))
