"""The report's plots: accuracy vs MACs, accuracy vs latency (log axis, each backend's Pareto front),
accuracy vs memory, latency vs batch; labels placed where they overlap nothing. matplotlib is imported
only here, and only when a plot is drawn. Split from :mod:`deploycomp.report`, which reads the run and
writes the tables and calls :func:`plot_study`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from deploycomp.files import atomic_path

if TYPE_CHECKING:
    from deploycomp.report import StudyReport


# Where a point's label may go, in points from the point, tried in order (right, left, above, below, ...);
# the first that overlaps no other label, no marker and stays inside the axes is taken.
LABEL_OFFSETS: tuple[tuple[int, int], ...] = (
    (6, 4), (6, -12), (-6, 4), (-6, -12), (0, 9), (0, -17), (12, 14), (12, -22), (-12, 14), (-12, -22),
    (0, 22), (0, -30), (20, 0), (-20, 0),
)


def label_points(ax, xs, ys, names) -> list:
    """Label every point with its name where the label overlaps no other label or marker (when it can).

    Greedy, in display space: each label takes the first of :data:`LABEL_OFFSETS` that is free, else the
    one that overlaps least. Call it after the axes' limits, scales and layout are final. Returns the texts.
    """
    fig = ax.figure
    fig.canvas.draw()  # limits, scales and layout settled: display coordinates are final
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    markers = [_box_around(to_px((x, y)), 4.0) for x, y in zip(xs, ys, strict=True)]
    if ax.get_legend() is not None:
        markers.append(ax.get_legend().get_window_extent(renderer))
    frame = ax.get_window_extent(renderer)
    placed: list = []
    texts = []
    for (x, y), name in zip(zip(xs, ys, strict=True), names, strict=True):
        best = None
        for dx, dy in LABEL_OFFSETS:
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                               ha="left" if dx > 0 else "right" if dx < 0 else "center", annotation_clip=False)
            text.set_in_layout(False)
            box = text.get_window_extent(renderer)
            cost = sum(_overlap(box, b) for b in (*placed, *markers)) + _outside(box, frame)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        placed.append(best[2])
        texts.append(best[1])
    return texts


def _box_around(xy, half: float):
    from matplotlib.transforms import Bbox

    return Bbox.from_extents(xy[0] - half, xy[1] - half, xy[0] + half, xy[1] + half)


def _overlap(a, b) -> float:
    """Area (pixels²) two boxes share."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame) -> float:
    """Area (pixels²) of ``box`` outside ``frame``."""
    return box.width * box.height - _overlap(box, frame)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point beats, fastest first.

    A point is on the front when every faster point is less accurate: the most accurate model within each
    latency budget.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    for i in order:
        if not front or points[i][1] > points[front[-1]][1]:
            front.append(i)
    return front


def _interval_err(rows: list[dict]):
    """Asymmetric error bars (2 x n) from the rows' median intervals (None when none was measured)."""
    if not any(r.get("latency_median_ci95_ms") for r in rows):
        return None
    lo = [max(0.0, r["latency_median_ms"] - r["latency_median_ci95_ms"][0]) if r.get("latency_median_ci95_ms")
          else 0.0 for r in rows]
    hi = [max(0.0, r["latency_median_ci95_ms"][1] - r["latency_median_ms"]) if r.get("latency_median_ci95_ms")
          else 0.0 for r in rows]
    return [lo, hi]


MARKERS = ("o", "s", "^", "D", "v", "P")  # one per precision and format of a backend


def accuracy_latency_figure(s: StudyReport, lat: list[dict], acc_label: str):
    """Accuracy vs latency (log axis): one colour per backend, one marker per precision, each backend's
    Pareto front as a dashed staircase, every point labelled without overlaps."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    backends = sorted({r["backend"] for r in lat})
    styles = sorted({(r["precision"], r["format"]) for r in lat})
    for b, backend in enumerate(backends):
        color = colors[b % len(colors)]
        mine = [r for r in lat if r["backend"] == backend]
        for key in styles:
            rs = [r for r in mine if (r["precision"], r["format"]) == key]
            if rs:
                ax.errorbar([r["latency_median_ms"] for r in rs], [r[s.metric] for r in rs],
                            xerr=_interval_err(rs), fmt=MARKERS[styles.index(key) % len(MARKERS)], color=color,
                            capsize=3, label=f"{backend} {key[0]} ({key[1]})")
        front = [mine[i] for i in pareto_front([(r["latency_median_ms"], r[s.metric]) for r in mine])]
        ax.step([r["latency_median_ms"] for r in front], [r[s.metric] for r in front], where="post",
                linestyle="--", color=color, alpha=0.6, label=f"{backend}: Pareto front")
    _log_x(ax)
    ax.set_xlabel(f"median latency (ms, log scale) at batch {s.headline['batch']}, {lat[0].get('device')} "
                  "(bars: 95% interval)")
    ax.set_ylabel(acc_label)
    ax.set_title(f"{s.name}: accuracy vs latency")
    ax.grid(alpha=0.3, which="both")
    ax.margins(x=0.12, y=0.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    label_points(ax, [r["latency_median_ms"] for r in lat], [r[s.metric] for r in lat], [r["variant"] for r in lat])
    return fig


def accuracy_memory_figure(s: StudyReport, rows: list[dict], acc_label: str):
    """Accuracy vs steady-state memory on the runtime: one colour per backend, one marker per precision,
    each backend's Pareto front, bars over the repeats' range."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = sorted({(r["precision"], r["format"]) for r in rows})
    for b, backend in enumerate(sorted({r["backend"] for r in rows})):
        color = colors[b % len(colors)]
        mine = [r for r in rows if r["backend"] == backend]
        for key in styles:
            rs = [r for r in mine if (r["precision"], r["format"]) == key]
            if rs:
                ax.plot([r["steady_rss_mib"] for r in rs], [r[s.metric] for r in rs],
                        MARKERS[styles.index(key) % len(MARKERS)], color=color, label=f"{backend} {key[0]} ({key[1]})")
        front = [mine[i] for i in pareto_front([(r["steady_rss_mib"], r[s.metric]) for r in mine])]
        ax.step([r["steady_rss_mib"] for r in front], [r[s.metric] for r in front], where="post",
                linestyle="--", color=color, alpha=0.6, label=f"{backend}: Pareto front")
    ax.set_xlabel(f"steady-state memory on the runtime (MiB above a fresh process's baseline) at batch "
                  f"{s.headline['batch']}")
    ax.set_ylabel(acc_label)
    ax.set_title(f"{s.name}: accuracy vs memory")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    label_points(ax, [r["steady_rss_mib"] for r in rows], [r[s.metric] for r in rows], [r["variant"] for r in rows])
    return fig


def _log_x(ax) -> None:
    """A log x axis ticked at 1, 2, 5 x 10^k and labelled as plain numbers (0.2, 1, 5)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    axis = ax.xaxis
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_study(s: StudyReport, out_dir: Path, prefix: str = "") -> list[Path]:
    """accuracy_vs_macs.png, accuracy_vs_latency.png, latency_vs_batch.png (those with data to show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    metric_name = "top-1 accuracy" if s.metric == "top1_pct" else s.metric_label
    acc_label = f"{metric_name} (%) on {s.dataset or 'the test set'}" + (" [synthetic: meaningless]"
                                                                         if s.synthetic else "")

    def save(fig, name):
        path = out_dir / f"{prefix}{name}.png"
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append(path)

    pts = [r for r in s.rows if r.get("macs_m") is not None and r.get(s.metric) is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.scatter([r["macs_m"] for r in pts[1:]], [r[s.metric] for r in pts[1:]], label="variants")
        ax.scatter([pts[0]["macs_m"]], [pts[0][s.metric]], marker="*", s=160, color="black", label=pts[0]["variant"])
        ax.set_xlabel("MACs per image (millions; FLOPs = 2 x MACs)")
        ax.set_ylabel(acc_label)
        ax.set_title(f"{s.name}: accuracy vs MACs")
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.12)
        ax.legend(fontsize=8)
        fig.tight_layout()
        label_points(ax, [r["macs_m"] for r in pts], [r[s.metric] for r in pts], [r["variant"] for r in pts])
        save(fig, "accuracy_vs_macs")

    batch = s.headline["batch"]
    lat = [r for r in s.latency_rows if r["batch"] == batch and r.get(s.metric) is not None
           and r.get("latency_median_ms") is not None]
    if lat:
        fig = accuracy_latency_figure(s, lat, acc_label)
        save(fig, "accuracy_vs_latency")
    mem = [r for r in s.latency_rows if r["batch"] == batch and r.get(s.metric) is not None
           and r.get("steady_rss_mib") is not None]
    if mem:
        save(accuracy_memory_figure(s, mem, acc_label), "accuracy_vs_memory")

    combos = sorted({(r["backend"], r["precision"], r["format"]) for r in s.latency_rows})
    if combos and len({r["batch"] for r in s.latency_rows}) > 1:
        fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 4.2), squeeze=False)
        for ax, key in zip(axes[0], combos, strict=True):
            for variant in dict.fromkeys(r["variant"] for r in s.latency_rows):
                rs = sorted((r for r in s.latency_rows if r["variant"] == variant
                             and (r["backend"], r["precision"], r["format"]) == key), key=lambda r: r["batch"])
                if rs:
                    ax.errorbar([r["batch"] for r in rs], [r["latency_median_ms"] for r in rs], yerr=_interval_err(rs),
                                marker="o", capsize=3, label=variant)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size (images)")
            ax.set_ylabel("median latency per batch (ms; bars: 95% interval)")
            ax.set_title(f"{key[0]} {key[1]} ({key[2]})", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{s.name}: latency vs batch")
        save(fig, "latency_vs_batch")
    return written


