"""``dacnn.experiments.plots``: the frontier figure zooms on its low-error cluster and keeps labels apart."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from dacnn.experiments import plots  # noqa: E402


def test_labels_of_crowded_points_do_not_overlap():
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(f"row number {i}", 1.0 + 0.02 * i, 10.0 + 0.05 * i) for i in range(4)]
    ax.scatter([x for _, x, _ in points], [y for _, _, y in points])
    ax.set_xlim(0.5, 2.0)
    ax.set_ylim(5, 15)
    plots._place_labels(ax, points)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == len(points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_frontier_adds_a_zoom_panel_when_a_few_points_are_far_above(tmp_path, monkeypatch):
    rows = [SimpleNamespace(id=f"r{i}", label=f"row {i}") for i in range(6)]
    errors = [80.0, 40.0, 12.0, 11.0, 10.5, 10.0]
    records = {r.id: {"test_error": e, "unique_params": 10 ** (3 + i)}
               for i, (r, e) in enumerate(zip(rows, errors))}
    panels = []
    real = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        panels.append(axes.size)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    path = plots.plot_frontier(tmp_path / "f.png", rows, records, "t", "c", lambda r: "sharing",
                               lambda rec: rec["unique_params"] / 1e6, "unique parameters (M)")
    assert path.is_file() and panels == [2]
    close = {r.id: {"test_error": 10.0 + i, "unique_params": 10 ** (3 + i)} for i, r in enumerate(rows)}
    plots.plot_frontier(tmp_path / "g.png", rows, close, "t", "c", lambda r: "sharing",
                        lambda rec: rec["unique_params"] / 1e6, "unique parameters (M)")
    assert panels == [2, 1]
