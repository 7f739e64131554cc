"""The report's PNG plots (matplotlib, Agg backend), each drawn from store records alone.

* :func:`plot_error_vs_params`: DACNN Figure 5, top-1 error against unique parameters (log scale),
  the paper's points beside ours;
* :func:`plot_frontier`: error against unique parameters or training CPU-seconds, coloured by
  strategy (sharing, narrowing, pruning), the Pareto set joined (:func:`pareto_set`);
* :func:`plot_curves`: Figures 4 and 6, validation error per epoch of each run (the paper plots
  test curves; our runs select on a held-out validation split and test once);
* :func:`plot_sweep`: error against a row's ``x`` (Table 2's depth, LruNet's reuse count N), one
  line per group (shared/free), paper and ours side by side;
* :func:`plot_filters`: Figure 7, the images that maximise each layer's first filters.

Files are written without timestamps, so re-running the report on the same records gives the
same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_error_vs_params", "plot_frontier", "pareto_set", "plot_curves", "plot_sweep", "plot_filters"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return path


def _error(record: dict[str, Any]) -> float | None:
    return record.get("test_error")


def plot_error_vs_params(path: Path, rows: Sequence[Any], records: dict[str, dict[str, Any]], title: str,
                         ours_caption: str) -> Path:
    """Two panels: the paper's (params, error) points and ours, each labelled by row."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (
        ("paper", [(r.label, r.paper.get("params_m"), r.paper.get("error")) for r in rows]),
        (ours_caption, [(r.label, (records[r.id]["unique_params"] or 0) / 1e6, _error(records[r.id]))
                        for r in rows if r.id in records]),
    )
    for ax, (caption, points) in zip(axes, panels):
        points = [(label, x, y) for label, x, y in points if x and y is not None]
        for label, x, y in points:
            ax.scatter(x, y, s=28)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("unique parameters (M)")
        ax.set_ylabel("top-1 test error (%)")
        ax.set_title(caption, fontsize=10)
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return _save(fig, path)


def pareto_set(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower x and lower error),
    in increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    best, keep = math.inf, []
    for i in order:
        if points[i][1] < best:
            keep.append(i)
            best = points[i][1]
    return keep


def _place_labels(ax: Any, points: Sequence[tuple[str, float, float]], fontsize: float = 6.5) -> None:
    """Annotate each ``(label, x, y)`` at the first of a few offsets where its text overlaps no label
    placed before it and no other point (greedy, left to right); the last offset if none is free."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    marks = [ax.transData.transform((x, y)) for _, x, y in points]
    placed: list[Any] = []
    offsets = [(4, 3, "left"), (4, -9, "left"), (-4, 3, "right"), (-4, -9, "right"), (4, 10, "left"),
               (4, -16, "left"), (-4, 10, "right"), (-4, -16, "right"), (4, 17, "left"), (4, -23, "left")]
    for label, x, y in sorted(points, key=lambda p: (p[1], p[2])):
        for dx, dy, ha in offsets:
            text = ax.annotate(label, (x, y), fontsize=fontsize, xytext=(dx, dy), textcoords="offset points",
                               ha=ha)
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            own = ax.transData.transform((x, y))
            hits_point = any(box.contains(*m) for m in marks if tuple(m) != tuple(own))
            if not hits_point and not any(box.overlaps(b) for b in placed):
                break
            if (dx, dy, ha) != offsets[-1]:
                text.remove()
        placed.append(box)


def plot_frontier(path: Path, rows: Sequence[Any], records: dict[str, dict[str, Any]], title: str,
                  caption: str, strategy: Callable[[Any], str | None], x_of: Callable[[dict[str, Any]], Any],
                  xlabel: str) -> Path:
    """Error against ``x_of(record)`` (log scale), one colour per strategy, the Pareto set joined.

    When a few points have much higher error than the rest, a second panel zooms on the low-error
    cluster (error within ``max(5, 20 %)`` of the range above the best), where labels would collide."""
    plt = _pyplot()
    from matplotlib import ticker

    pts = [(r, x_of(records[r.id]), _error(records[r.id])) for r in rows if r.id in records]
    pts = [(r, x, y) for r, x, y in pts if x and y is not None]
    ys = [y for _, _, y in pts]
    cut = min(ys) + max(5.0, 0.2 * (max(ys) - min(ys))) if ys else 0.0
    zoom = [p for p in pts if p[2] <= cut]
    panels = [(pts, caption)] + ([(zoom, f"{caption}: error below {cut:.0f} %")]
                                 if len(pts) - len(zoom) >= 2 and len(zoom) >= 2 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels) - 1, 5.5), squeeze=False)
    styles = {"sharing": ("tab:blue", "o"), "narrowing": ("tab:orange", "s"), "pruning": ("tab:green", "^")}
    for ax, (panel, text) in zip(axes[0], panels):
        seen = set()
        for r, x, y in panel:
            name = strategy(r) or "other"
            color, marker = styles.get(name, ("tab:gray", "x"))
            ax.scatter(x, y, s=36, color=color, marker=marker, label=None if name in seen else name)
            seen.add(name)
        ranked = [(x, y) for r, x, y in panel if strategy(r) is not None]
        front = pareto_set(ranked)
        if front:
            xs, fys = zip(*(ranked[i] for i in front))
            ax.step(xs, fys, where="post", color="black", alpha=0.5, linewidth=1, label="Pareto set")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 1-2-5 ticks, plain numbers
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 test error (%)")
        ax.set_title(text, fontsize=10)
        ax.grid(alpha=0.3)
        if panel:
            ax.legend(fontsize=8, loc="upper right")
            zoomed = len(panels) > 1 and panel is pts
            _place_labels(ax, [(r.label, x, y) for r, x, y in panel if not (zoomed and y <= cut)])
        else:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return _save(fig, path)


def plot_curves(path: Path, rows: Sequence[Any], records: dict[str, dict[str, Any]], title: str,
                caption: str) -> Path:
    """Validation error per epoch, one line per row; one panel per dataset."""
    plt = _pyplot()
    datasets = sorted({records[r.id]["dataset"] for r in rows if r.id in records}) or ["-"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in rows:
            rec = records.get(r.id)
            if rec is None or rec["dataset"] != dataset:
                continue
            points = [(c["epoch"] + 1, 100.0 - c["val_acc"]) for c in rec.get("curve") or []
                      if c.get("val_acc") is not None]
            if points:
                xs, ys = zip(*points)
                style = "--" if (r.group or "").startswith(("resnet", "vgg", "baseline")) else "-"
                ax.plot(xs, ys, style, marker="o", markersize=3, label=r.label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation error (%)")
        ax.set_title(f"{caption}: {dataset}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return _save(fig, path)


def plot_sweep(path: Path, rows: Sequence[Any], records: dict[str, dict[str, Any]], title: str,
               xlabel: str, ours_caption: str) -> Path:
    """Error against ``row.x`` per group: the paper's numbers (left) and ours (right)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = list(dict.fromkeys(r.group or "all" for r in rows))
    for ax, caption, value in (
        (axes[0], "paper", lambda r: r.paper.get("error")),
        (axes[1], ours_caption, lambda r: _error(records[r.id]) if r.id in records else None),
    ):
        drawn = False
        for group in groups:
            pts = sorted((r.x, value(r)) for r in rows if (r.group or "all") == group
                         and r.x is not None and value(r) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=group)
                drawn = True
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 test error (%)")
        ax.set_title(caption, fontsize=10)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return _save(fig, path)


def plot_filters(path: Path, images: np.ndarray, layers: Sequence[str], title: str) -> Path:
    """A grid: one row per layer, one column per filter (Figure 7)."""
    plt = _pyplot()
    n_layers, n_filters = images.shape[:2]
    fig, axes = plt.subplots(n_layers, n_filters, figsize=(1.6 * n_filters, 1.6 * n_layers + 0.6),
                             squeeze=False)
    for li in range(n_layers):
        for fi in range(n_filters):
            ax = axes[li][fi]
            img = images[li, fi]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if fi == 0:
                ax.set_ylabel(f"layer {li + 1}", fontsize=8)
            if li == 0:
                ax.set_title(f"filter {fi + 1}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
