"""Figures of a run: samples beside real data, sampling trajectories, loss curves.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so writing them leaves the
caller's backend (a notebook's inline plots) alone.

Images are tiled in ``cols`` columns (the number of classes for a class-conditional model,
whose samples cycle through the classes, so each column is one class); 2-D points are
drawn whole, generated and real on the same axes limits.
"""

from __future__ import annotations

import numpy as np

__all__ = ["loss_curve", "sample_grid", "trajectory_gif"]


def _figure(figsize):
    """A figure on its own Agg canvas (no pyplot state; garbage-collected like any object)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _tile(images: np.ndarray, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    rows = int(np.ceil(n / cols))
    canvas = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = img
    return canvas


def _limits(*point_sets: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Shared axis limits covering the central 99.8% of every set (a few strays do not squash the rest)."""
    both = np.concatenate([p for p in point_sets if len(p)])
    lo, hi = np.quantile(both, 0.001, axis=0), np.quantile(both, 0.999, axis=0)
    pad = 0.08 * (hi - lo)
    return (lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1])


def _draw(ax, data: np.ndarray, cols: int, limits) -> None:
    if data.ndim == 2:
        ax.scatter(data[:, 0], data[:, 1], s=3, alpha=0.5, linewidths=0)
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
        ax.set_aspect("equal")
    else:
        grid = _tile((np.clip(data, -1, 1) + 1) / 2, cols)
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])


def sample_grid(samples: np.ndarray, real: np.ndarray, path: str, title: str = "", cols: int | None = None) -> None:
    """Generated samples beside real data: image grids in ``cols`` columns, or 2-D scatter plots on shared axes."""
    cols = cols or int(np.ceil(np.sqrt(len(samples))))
    limits = _limits(samples, real) if samples.ndim == 2 else None
    fig = _figure((9, 4.8))
    axes = fig.subplots(1, 2)
    for ax, data, name in ((axes[0], samples, "generated"), (axes[1], real, "real")):
        _draw(ax, data, cols, limits)
        ax.set_title(f"{name} ({len(data)})")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def trajectory_gif(frames: np.ndarray, times: np.ndarray, path: str, cols: int | None = None, fps: int = 6) -> None:
    """An animated GIF of a sampling path: ``frames[k]`` (samples at time ``times[k]``), one frame each.

    Image frames noisier than the last are scaled down to its spread, so that the noise shows as
    texture instead of saturating the grey scale.
    """
    from matplotlib.animation import FuncAnimation, PillowWriter

    frames = np.asarray(frames, np.float32)
    if frames.ndim > 3:
        spread = frames.reshape(len(frames), -1).std(axis=1)
        frames = frames * np.minimum(1.0, spread[-1] / np.maximum(spread, 1e-12)).reshape(-1, *[1] * (frames.ndim - 1))
    cols = cols or int(np.ceil(np.sqrt(frames.shape[1])))
    limits = _limits(frames[-1], frames[0]) if frames.ndim == 3 else None
    fig = _figure((4.8, 4.8))
    ax = fig.subplots()

    def show(k):
        ax.clear()
        _draw(ax, frames[k], cols, limits)
        ax.set_title(f"step {k} of {len(frames) - 1}, t = {float(times[k]):.3g}")

    animation = FuncAnimation(fig, show, frames=len(frames))
    animation.save(path, writer=PillowWriter(fps=fps))


def loss_curve(records: list[dict], path: str) -> None:
    """Training loss against step: a log scale when it spans more than a decade, plain tick labels either way."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig = _figure((5, 3.4))
    ax = fig.subplots()
    losses = [r["loss"] for r in records if r["loss"] > 0]
    if records:
        ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    if losses and max(losses) > 10 * min(losses):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
