"""Figures: the loss matrix with forgetting per stream, and the benchmark's arms side by side.

``lifelong eval --plot`` saves :func:`loss_matrix_figure` as a PNG; each cycle logs the
same figure to TensorBoard (:func:`figure_to_image`); ``scripts/bench_continual.py`` draws
:func:`arms_figure`. Only the Agg backend is used, through ``matplotlib.figure.Figure``
and ``FigureCanvasAgg`` (no pyplot global state, no display); matplotlib is imported inside
the functions so ``import lifelong`` stays light. Non-finite numbers are drawn as gaps and
never written out as ``nan``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from expert_store import atomic_write

from .evaluate import LossMatrix

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["arms_figure", "figure_to_image", "loss_matrix_figure", "save_png", "write_loss_matrix_png"]

DEFAULT_SIZE = (1200, 500)  # pixels (width, height) at DEFAULT_DPI
DEFAULT_DPI = 100
_MAX_ANNOTATED_CELLS = 400  # above this the heatmap carries no numbers (they would not fit)
_WORSE, _BETTER = "#c0392b", "#2e86c1"  # forgetting > 0 (worse) / <= 0


def _finite(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing or not finite."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _new_figure(size: tuple[int, int] = DEFAULT_SIZE, dpi: int = DEFAULT_DPI) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="dimgrey")
    ax.set_xticks([])
    ax.set_yticks([])


def _heatmap(ax: Any, matrix: LossMatrix) -> None:
    import matplotlib as mpl

    data = np.array([[np.nan if _finite(x) is None else float(x) for x in row] for row in matrix.values], dtype=float)
    data = data.reshape(len(matrix.values), len(matrix.streams))  # (versions, streams)
    masked = np.ma.masked_invalid(data)
    cmap = mpl.colormaps["viridis_r"].with_extremes(bad="#d9d9d9")  # dark = high loss; grey = not evaluated
    finite = data[np.isfinite(data)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(matrix.streams)), matrix.streams, rotation=30 if len(matrix.streams) > 4 else 0, ha="right" if len(matrix.streams) > 4 else "center")
    ax.set_yticks(range(len(matrix.versions)), [f"v{v} {t or '-'}" for v, t in zip(matrix.versions, matrix.trained)])
    ax.set_xlabel("held-out stream")
    ax.set_ylabel("version (stream trained)")
    ax.set_title("held-out loss (nats/token; lower is better)")
    if data.size <= _MAX_ANNOTATED_CELLS:
        size = 9 if data.size <= 60 else 7
        for (i, j), x in np.ndenumerate(data):
            if math.isfinite(x):
                dark = (x - vmin) / (vmax - vmin) > 0.5  # the high end of viridis_r is dark
                ax.text(j, i, f"{x:.3f}", ha="center", va="center", fontsize=size, color="white" if dark else "black")
    ax.figure.colorbar(im, ax=ax, label="nats/token", shrink=0.9)


def _forgetting_bars(ax: Any, forgetting: Mapping[str, Any], version: int | None) -> None:
    items = [(s, _finite(v)) for s, v in forgetting.items()]
    items = [(s, v) for s, v in items if v is not None]
    ax.set_title("forgetting" + ("" if version is None else f" at v{version}") + " (nats; > 0 is worse)")
    if not items:
        _note(ax, "no forgetting yet\n(no earlier stream evaluated twice)")
        return
    names, values = [s for s, _ in items], [v for _, v in items]
    bars = ax.bar(range(len(names)), values, width=0.6, color=[_WORSE if v > 0 else _BETTER for v in values])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.75, len(names) - 0.25)
    ax.bar_label(bars, labels=[f"{v:+.3f}" for v in values], fontsize=9, padding=2)
    ax.margins(y=0.2)
    ax.set_ylabel("last minus best earlier loss (nats)")


def loss_matrix_figure(matrix: LossMatrix, forgetting: Mapping[str, float] | None = None, title: str | None = None,
                       size: tuple[int, int] = DEFAULT_SIZE, dpi: int = DEFAULT_DPI) -> Figure:
    """Left: the held-out loss matrix as a heatmap (rows: versions with the stream each
    trained, columns: streams; cells never evaluated grey, values annotated). Right:
    forgetting per stream as bars around a 0 line (default: ``matrix.forgetting()``)."""
    fig = _new_figure(size, dpi)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    if matrix.values and matrix.streams:
        _heatmap(left, matrix)
    else:
        left.set_title("held-out loss (nats/token)")
        _note(left, "no evaluated version yet")
    _forgetting_bars(right, matrix.forgetting() if forgetting is None else forgetting, matrix.versions[-1] if matrix.versions else None)
    if title:
        fig.suptitle(title)
    return fig


def _arm_list(results: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    if isinstance(results, Mapping):
        return [(str(r.get("arm", name)), r) for name, r in results.items()]
    return [(str(r.get("arm", i)), r) for i, r in enumerate(results)]


def _grouped_bars(ax: Any, arms: list[str], series: dict[str, list[float | None]], fmt: str) -> None:
    """Bars per arm (x), one per series; missing values leave a gap."""
    n = max(len(series), 1)
    width = 0.8 / n
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(arms))]
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not pts:
            continue
        bars = ax.bar([x for x, _ in pts], [v for _, v in pts], width=width, label=label)
        ax.bar_label(bars, labels=[format(v, fmt) for _, v in pts], fontsize=7, padding=1)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.margins(y=0.15)
    if len(series) > 1:
        ax.legend(fontsize=8)


def arms_figure(results: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]],
                size: tuple[int, int] = (1500, 500), dpi: int = DEFAULT_DPI, title: str | None = None) -> Figure:
    """The benchmark's arms side by side (the result dicts of ``scripts/bench_continual.py``):
    mean forgetting; mean new-stream and final mean held-out loss; and, when any arm has
    it, routing per stream (``routing_retention``, else ``routing_to_grown``)."""
    arms = _arm_list(results)
    names = [a for a, _ in arms]
    key = next((k for k in ("routing_retention", "routing_to_grown") if any(r.get(k) for _, r in arms)), None)
    fig = _new_figure(size, dpi)
    axes = fig.subplots(1, 3 if key else 2)
    if not arms:
        for ax in axes:
            _note(ax, "no arm")
        return fig

    ax = axes[0]
    values = [_finite(r.get("mean_forgetting")) for _, r in arms]
    xs = [(i, v) for i, v in enumerate(values) if v is not None]
    bars = ax.bar([i for i, _ in xs], [v for _, v in xs], color=[_WORSE if v > 0 else _BETTER for _, v in xs])
    ax.bar_label(bars, labels=[f"{v:+.3f}" for _, v in xs], fontsize=8, padding=2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.margins(y=0.2)
    ax.set_title("mean forgetting (nats; > 0 is worse)")

    _grouped_bars(axes[1], names, {
        "new-stream loss": [_finite(r.get("mean_new_stream_loss")) for _, r in arms],
        "final mean loss": [_finite(r.get("final_mean_loss")) for _, r in arms],
    }, ".3f")
    axes[1].set_title("held-out loss (nats; lower is better)")

    if key:
        streams: list[str] = []
        for _, r in arms:
            streams += [s for s in (r.get(key) or {}) if s not in streams]
        _grouped_bars(axes[2], names, {s: [_finite((r.get(key) or {}).get(s)) for _, r in arms] for s in streams}, ".0%")
        axes[2].yaxis.set_major_formatter(lambda y, _pos: f"{y:.0%}")
        axes[2].set_title("routing kept on the stream's experts" if key == "routing_retention"
                          else "router weight on experts grown after the stream")
    if title:
        fig.suptitle(title)
    return fig


def save_png(fig: Figure, path: str | PathLike[str], size: tuple[int, int] | None = None, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as a PNG of ``size`` pixels (width, height; default: the figure's own)
    atomically (a temp file in the same directory, then ``os.replace``); returns the path."""
    if size is not None:
        fig.set_size_inches(size[0] / dpi, size[1] / dpi)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # no bbox_inches="tight": that would change the size
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path


def figure_to_image(fig: Figure) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 RGB array (for TensorBoard's ``add_image``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)


def write_loss_matrix_png(matrix: LossMatrix, forgetting: Mapping[str, float] | None, path: str | PathLike[str],
                          size: tuple[int, int] = DEFAULT_SIZE, title: str | None = None) -> Path:
    """:func:`loss_matrix_figure` saved by :func:`save_png` at ``size`` pixels."""
    return save_png(loss_matrix_figure(matrix, forgetting, title=title, size=size), path, size=size)
