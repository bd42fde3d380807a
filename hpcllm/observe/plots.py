"""Figures written to files: headless (Agg), laid out, and replaced atomically so a reader never
sees half a PNG. Used by the loss curve and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def figure(ncols: int = 1, width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def save(fig: Any, path: Path, legend_size: float | None = None) -> None:
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
