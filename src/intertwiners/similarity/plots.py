"""Writing layer x layer similarity matrices: CSV tables and heatmap PNGs (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._util import save_figure


def write_matrix_csv(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str | Path) -> Path:
    """CSV with a header ``site_a\\site_b, <cols...>`` and one row per site of model A."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["site_a\\site_b", *cols])
        for name, row in zip(rows, np.asarray(matrix)):
            w.writerow([name, *(f"{v:.6f}" for v in row)])
    return path


def read_matrix_csv(path: str | Path) -> tuple[np.ndarray, list[str], list[str]]:
    """Inverse of :func:`write_matrix_csv`: (matrix, row sites, column sites)."""
    with Path(path).open(newline="") as f:
        table = list(csv.reader(f))
    cols = table[0][1:]
    rows = [r[0] for r in table[1:]]
    return np.array([[float(v) for v in r[1:]] for r in table[1:]]), rows, cols


def plot_matrices(panels: dict[str, np.ndarray], rows: Sequence[str], cols: Sequence[str], path: str | Path,
                  title: str = "", xlabel: str = "model B", ylabel: str = "model A", vmin: float = 0.0,
                  vmax: float = 1.0) -> Path:
    """Heatmaps of layer x layer matrices side by side, one panel per entry of ``panels`` (panel title ->
    (len(rows), len(cols)) matrix); values are printed in the cells of small matrices. ``intertwiners
    similarity`` and the report's Figs. 2 and 5 are drawn with this function. Writes a PNG; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("plot_matrices: no matrices to draw")
    size = max(3.5, 0.45 * max(len(rows), len(cols)) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=((size + 1) * len(panels), size), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], panels.items()):
        m = np.asarray(matrix, dtype=float)
        im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="magma", origin="lower")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        if m.size <= 64:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < (vmin + vmax) / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], path: str | Path,
                 title: str = "", xlabel: str = "model B", ylabel: str = "model A",
                 vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """One heatmap PNG of a (len(rows), len(cols)) matrix (:func:`plot_matrices` with one panel)."""
    return plot_matrices({title: matrix}, rows, cols, path, xlabel=xlabel, ylabel=ylabel, vmin=vmin, vmax=vmax)
