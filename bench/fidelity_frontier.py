"""The reuse-accuracy frontier of a `kvmesh bench fidelity` run: one point per variant and shape.

x: the share of the downstream prompts' tokens that were not prefilled (reused from segments, or read from
the exact prefix cache); y: accuracy minus dense's on the same items, in points, with its paired 95%
interval; the label gives the variant and its TTFT speedup over dense. The band marks +-2 points, the
promise `auto` keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

Json = dict[str, Any]
TOLERANCE_POINTS = 2.0


def frontier_rows(results: Json) -> list[Json]:
    """Per shape and variant: what the plot shows, as a table (also for bench/NOTES.md)."""
    rows = []
    for shape, task in results["tasks"].items():
        for name, mode in task["modes"].items():
            served = (mode["reused_token_share"] or 0.0) + (mode["cached_token_share"] or 0.0)
            rows.append(
                {
                    "shape": shape,
                    "variant": name,
                    "not_prefilled_share": served,
                    "reused_token_share": mode["reused_token_share"],
                    "delta_points": 100 * mode["delta_vs_dense"],
                    "ci95_points": [100 * bound for bound in mode["ci95"]],
                    "speedup_vs_dense": mode["speedup_vs_dense"],
                    "first_token_agreement": mode["first_token_agreement"],
                    "mean_kl": mode["mean_kl"],
                }
            )
    return rows


def plot_frontier(results: Json, path: str | Path) -> Path:
    """Write the frontier as a PNG (one panel per shape); returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "the frontier plot needs matplotlib: pip install matplotlib (or scripts/setup.sh --dev)"
        ) from None
    rows = frontier_rows(results)
    shapes = list(results["tasks"])
    figure, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 5.2), squeeze=False)
    for axis, shape in zip(axes[0], shapes, strict=True):
        points = [row for row in rows if row["shape"] == shape]
        axis.axhspan(-TOLERANCE_POINTS, TOLERANCE_POINTS, color="tab:green", alpha=0.12, label="within 2 points")
        axis.axhline(0, color="grey", linewidth=0.8)
        for row in points:
            low, high = row["ci95_points"]
            x, y = 100 * row["not_prefilled_share"], row["delta_points"]
            axis.errorbar(
                x,
                y,
                yerr=[[y - low], [high - y]],
                fmt="o",
                capsize=3,
                color="black" if row["variant"] == "dense" else "tab:blue",
            )
            speedup = row["speedup_vs_dense"]
            label = row["variant"] + (f" {speedup:.2f}x" if speedup else "")
            axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        items = results["tasks"][shape]["items"]
        axis.set_title(f"{shape} ({items} items)")
        axis.set_xlabel("downstream prompt tokens not prefilled (%)")
        axis.set_ylabel("accuracy - dense (points, paired 95% CI)")
        axis.set_xlim(-2, 102)
        axis.legend(loc="lower left", fontsize=8)
    model = results.get("model", {}).get("name", "")
    figure.suptitle(f"kvmesh bench fidelity: reuse vs answers ({model}); label: variant, TTFT speedup vs dense")
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
