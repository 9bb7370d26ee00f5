"""The evaluations' heatmap: a grid of scores in 0..1, red to green, each cell labelled, written
atomically. Shared by `needle` (depth x length) and `ruler` (task x length)."""

from __future__ import annotations

import io
import itertools
import pathlib
from collections.abc import Sequence

import numpy as np

from glm_jax.evals.rundir import write_atomic


def plot_grid(grid: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, xlabel: str, ylabel: str, title: str,
              png: pathlib.Path, scale: float = 1.0) -> str | None:
    """grid [rows, cols] of scores in 0..scale (NaN: no result yet) as a picture; None without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("score", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#d9d9d9")
    n_rows, n_cols = grid.shape
    width = max(6, 0.7 * n_cols + 3 + 0.06 * max((len(r) for r in rows), default=0))
    fig, ax = plt.subplots(figsize=(min(18, width), min(12, max(3.5, 0.45 * n_rows + 2))))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=scale, aspect="auto")
    if n_rows * n_cols <= 400:
        digits = 2 if scale == 1 else 1
        for i, j in itertools.product(range(n_rows), range(n_cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.{digits}f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(n_cols), list(cols), rotation=45 if n_cols > 8 else 0, ha="right" if n_cols > 8 else "center")
    ax.set_yticks(range(n_rows), list(rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(png, buffer.getvalue())
    return str(png)
