"""Figures the main job writes: sample grids and loss curves (matplotlib, Agg backend)."""

from __future__ import annotations

import numpy as np

__all__ = ["loss_curve", "sample_grid"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tile(images: np.ndarray, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    rows = int(np.ceil(n / cols))
    canvas = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = img
    return canvas


def sample_grid(samples: np.ndarray, real: np.ndarray, path: str, title: str = "") -> None:
    """Generated samples beside real data: image grids for images, scatter plots for 2-D points."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    for ax, data, name in ((axes[0], samples, "generated"), (axes[1], real, "real")):
        if data.ndim == 2:
            ax.scatter(data[:, 0], data[:, 1], s=2, alpha=0.6)
            ax.set_aspect("equal")
        else:
            grid = _tile((np.clip(data, -1, 1) + 1) / 2, cols=int(np.ceil(np.sqrt(len(data)))))
            ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curve(records: list[dict], path: str) -> None:
    """Training loss against step (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if records:
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records])
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
