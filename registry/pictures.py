"""Pictures for the MLflow UI: the lineage graph of a version, logged with its registration run.

The picture is read in MLflow's artifact viewer, which shows an image at most about 800 px
wide: the figure is sized from the graph (generations as rows, at most three boxes a row, so it
never grows too wide to read), with 12-point text. Each box says what the artifact is (kind),
its registry name and version, its format and quantization, and the first 8 hex digits of its
sha256; the version the picture belongs to has a heavy border. An edge reaching past the next
row curves around the boxes in between.

A picture goes stale whenever an edge is added to a version's graph (an evaluation recorded by
``llmops bench``, a prompt linked on promotion, a new version of the same bytes): :func:`redraw`
is the one function every such writer calls. It is a convenience for the UI, so its failures are
warnings, never errors. Beside the PNG, ``lineage.mmd`` holds the same graph as mermaid text.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmops.registry.lineage import Graph, Node

ARTIFACT_DIR = "lineage"
PNG = "lineage.png"
MERMAID = "lineage.mmd"
# Versions redrawn for one new edge at most (the edge's child and what was made from it).
MAX_REDRAW = 32

# Geometry, in inches (1 inch = 100 px in the PNG).
DPI = 100
BOX_W, BOX_H = 3.2, 1.3
GAP_X, GAP_Y = 0.45, 1.05
PER_ROW = 3
SLOT_W = 0.5  # the width an edge passing through a row takes in it
MARGIN = 0.3
TITLE_H = 0.75
MIN_W = 6.0
FONT = 12
SMALL = 10.5
MIN_FONT = 8.5

COLOURS = {"model": "#dbeafe", "checkpoint": "#fef3c7", "dataset": "#dcfce7", "prompt": "#fce7f3"}
KIND_ORDER = {"model": 0, "checkpoint": 1, "dataset": 2, "prompt": 3}


@dataclass
class _Box:
    node: Node
    x: float  # centre
    y: float
    row: int


@dataclass
class _Layout:
    boxes: dict[int, _Box]
    routes: dict[int, list[tuple[float, float]]]  # per edge (index in the graph's edges): its waypoints
    width: float
    height: float


def node_lines(node: Node, label: str | None = None) -> list[str]:
    """kind; registry name/version (or file name); format/quant; short sha256."""
    fmt = " · ".join(x for x in (node.format, node.quant) if x and x not in ("none", node.kind))
    name = label or (node.labels[0] if node.labels else node.name)
    lines = [node.kind.upper(), name]
    if fmt:
        lines.append(fmt)
    lines.append(f"sha256 {node.sha256[:8]}")
    return lines


def _levels(g: Graph) -> dict[int, int]:
    """Longest-path generations from the root, so that every edge points one way (down the
    page): a dataset that evaluated both a model and its source sits above the source."""
    level = {g.root: 0}
    edges = [e for e in g.edges if e.parent in g.nodes and e.child in g.nodes]
    for _ in range(len(g.nodes) + 1):  # bounded: a cycle cannot loop forever
        changed = False
        for e in edges:
            near, far = (e.child, e.parent) if g.direction == "up" else (e.parent, e.child)
            if near in level and level.get(far, -1) < level[near] + 1 <= len(g.nodes):
                level[far] = level[near] + 1
                changed = True
        if not changed:
            break
    return level


def _row_y(height: float, row: int) -> float:
    return height - TITLE_H - MARGIN - BOX_H / 2 - row * (BOX_H + GAP_Y)


def _layout(g: Graph) -> _Layout:
    """Rows of boxes, parents above children; an edge that skips rows passes through a narrow
    slot of its own in each row between, so it never crosses a box. Within a row, items follow
    the mean position of what they hang from in the rows above (fewer crossings)."""
    level = _levels(g)
    by_level: dict[int, list[Node]] = {}
    for node_id, lv in level.items():
        if node_id in g.nodes:
            by_level.setdefault(lv, []).append(g.nodes[node_id])
    # ancestors on top for "up" (the version at the bottom), descendants below for "down"
    rows: list[list[Node]] = []
    for lv in sorted(by_level, reverse=g.direction == "up"):
        nodes = sorted(by_level[lv], key=lambda n: (KIND_ORDER.get(n.kind, 9), n.name, n.id))
        rows += [nodes[i:i + PER_ROW] for i in range(0, len(nodes), PER_ROW)]
    row_of = {n.id: r for r, nodes in enumerate(rows) for n in nodes}
    edges = [(i, e) for i, e in enumerate(g.edges) if e.parent in row_of and e.child in row_of]
    # items per row: ("node", id) or ("slot", edge index, step)
    items: list[list[tuple]] = [[("node", n.id) for n in nodes] for nodes in rows]
    for i, e in edges:
        top, bottom = sorted((row_of[e.parent], row_of[e.child]))
        for r in range(top + 1, bottom):
            items[r].append(("slot", i, r))
    def width_of(item: tuple) -> float:
        return BOX_W if item[0] == "node" else SLOT_W

    spans = [sum(width_of(it) for it in row) + GAP_X * (len(row) - 1) for row in items]
    width = max(MIN_W, 2 * MARGIN + max(spans))
    height = TITLE_H + 2 * MARGIN + len(rows) * BOX_H + (len(rows) - 1) * GAP_Y
    x_of: dict[tuple, float] = {}
    above: dict[tuple, list[tuple]] = {}  # item -> the items it hangs from in the row above
    for i, e in edges:
        top, bottom = sorted((row_of[e.parent], row_of[e.child]))
        upper = ("node", e.parent) if row_of[e.parent] == top else ("node", e.child)
        lower = ("node", e.child) if upper == ("node", e.parent) else ("node", e.parent)
        chain = [upper] + [("slot", i, r) for r in range(top + 1, bottom)] + [lower]
        for a, b in zip(chain, chain[1:]):
            above.setdefault(b, []).append(a)
    for r, row in enumerate(items):
        def centre(item: tuple, _r: int = r) -> tuple[int, float]:
            xs = [x_of[a] for a in above.get(item, []) if a in x_of]
            return (0, sum(xs) / len(xs)) if xs else (1, 0.0)
        row.sort(key=lambda it: (*centre(it), it[0] == "slot"))  # stable: kind order among the rest
        x = (width - spans[r]) / 2
        for it in row:
            x_of[it] = x + width_of(it) / 2
            x += width_of(it) + GAP_X
    boxes = {n.id: _Box(n, x_of[("node", n.id)], _row_y(height, r), r) for r, nodes in enumerate(rows) for n in nodes}
    routes: dict[int, list[tuple[float, float]]] = {}
    for i, e in edges:
        top, bottom = sorted((row_of[e.parent], row_of[e.child]))
        pts = []
        for r in range(top + 1, bottom):
            sx, sy = x_of[("slot", i, r)], _row_y(height, r)
            pts += [(sx, sy + BOX_H / 2), (sx, sy - BOX_H / 2)]
        routes[i] = pts
    return _Layout(boxes, routes, width, height)


def _fit(text, renderer, width_px: float, fontsize: float) -> None:  # noqa: ANN001 - matplotlib Text
    """Shrink a line to fit its box, then shorten it in the middle."""
    size = fontsize
    while text.get_window_extent(renderer).width > width_px and size > MIN_FONT:
        size -= 0.5
        text.set_fontsize(size)
    full = text.get_text()
    keep = len(full)
    while text.get_window_extent(renderer).width > width_px and keep > 8:
        keep -= 2
        text.set_text(full[: keep // 2] + "…" + full[len(full) - keep // 2:])


def preload() -> None:
    """Import matplotlib on a thread of its own, ahead of drawing: the import is most of a
    picture's cost (0.4 s of 0.5), and a registration spends that long waiting for its bytes to be
    copied and hashed anyway (threads that wait release the interpreter to this one)."""
    import threading

    def load() -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
            from matplotlib import patches  # noqa: F401
        except Exception:  # noqa: BLE001, S110 - drawing will import (and report) it again
            pass

    threading.Thread(target=load, name="llmops-preload-matplotlib", daemon=True).start()


def lineage_png(g: Graph, path: str | Path, root_label: str | None = None) -> Path:
    """Draw ``g`` to ``path`` (PNG); ``root_label`` names the root box (e.g. the one version of
    several holding the same bytes that the picture is for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as MplPath

    lay = _layout(g)
    boxes, width, height = lay.boxes, lay.width, lay.height
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    renderer = fig.canvas.get_renderer()
    root = g.nodes.get(g.root)
    title = root_label or (node_lines(root)[1] if root else "lineage")
    head = ax.text(MARGIN, height - 0.3, f"lineage of {title}", fontsize=14, fontweight="bold", va="center")
    _fit(head, renderer, (width - 2 * MARGIN) * DPI, 14)
    ax.text(MARGIN, height - 0.58, "arrows point from what was used to what was made" if lay.routes
            else "nothing recorded that it was made from, evaluated on or uses",
            fontsize=SMALL, color="#555", va="center")

    # boxes
    inner_px = (BOX_W - 0.24) * DPI
    for node_id, b in boxes.items():
        n = b.node
        is_root = node_id == g.root
        ax.add_patch(FancyBboxPatch((b.x - BOX_W / 2, b.y - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0,rounding_size=0.12", fc=COLOURS.get(n.kind, "#eeeeee"),
                                    ec="#1e3a8a" if is_root else "#6b7280", lw=3 if is_root else 1.2, zorder=2))
        lines = node_lines(n, root_label if is_root else None)
        styles = [dict(fontsize=SMALL, color="#374151", fontweight="bold"), dict(fontsize=FONT, fontweight="bold")]
        styles += [dict(fontsize=FONT)] * (len(lines) - 3) + [dict(fontsize=SMALL, family="monospace", color="#374151")]
        step = BOX_H / (len(lines) + 0.6)
        top = b.y + BOX_H / 2 - step * 0.8
        for i, (line, style) in enumerate(zip(lines, styles)):
            t = ax.text(b.x, top - i * step, line, ha="center", va="center", zorder=3, **style)
            _fit(t, renderer, inner_px, style["fontsize"])

    # edges: from the upper box's bottom to the lower box's top, ends spread along the box edges
    drawn = [(i, e) for i, e in enumerate(g.edges) if i in lay.routes]
    first_hop: dict[int, tuple[float, float]] = {}
    last_hop: dict[int, tuple[float, float]] = {}
    for i, e in drawn:
        p, c = boxes[e.parent], boxes[e.child]
        upper, lower = (p, c) if p.row < c.row else (c, p)
        route = lay.routes[i]
        first_hop[i] = route[0] if route else (lower.x, lower.y)
        last_hop[i] = route[-1] if route else (upper.x, upper.y)
    leaving: dict[int, list[int]] = {}
    arriving: dict[int, list[int]] = {}
    for i, e in drawn:
        p, c = boxes[e.parent], boxes[e.child]
        upper, lower = (e.parent, e.child) if p.row < c.row else (e.child, e.parent)
        leaving.setdefault(upper, []).append(i)
        arriving.setdefault(lower, []).append(i)

    def spread(node_id: int, ids: list[int], toward: dict[int, tuple[float, float]]) -> dict[int, float]:
        ordered = sorted(ids, key=lambda i: toward[i][0])
        k = len(ordered)
        return {i: boxes[node_id].x + (0 if k == 1 else (j / (k - 1) - 0.5) * BOX_W * 0.6)
                for j, i in enumerate(ordered)}

    x_out: dict[int, float] = {}
    x_in: dict[int, float] = {}
    for node_id, ids in leaving.items():
        x_out.update(spread(node_id, ids, first_hop))
    for node_id, ids in arriving.items():
        x_in.update(spread(node_id, ids, last_hop))
    placed: list = []
    for i, e in drawn:
        p, c = boxes[e.parent], boxes[e.child]
        upper, lower = (p, c) if p.row < c.row else (c, p)
        start = (x_out[i], upper.y - BOX_H / 2)
        end = (x_in[i], lower.y + BOX_H / 2)
        pts = [start, *lay.routes[i], end]
        if upper is not p:  # a drawing "down": the arrow still points from parent to child
            pts = pts[::-1]
        line = MplPath(pts, [MplPath.MOVETO] + [MplPath.LINETO] * (len(pts) - 1))
        ax.add_patch(FancyArrowPatch(path=line, arrowstyle="-|>", mutation_scale=16, color="#4b5563", lw=1.4,
                                     zorder=1, joinstyle="round"))
        # the label on the edge's first hop, slid along it until it is clear of the others
        (x0, y0), (x1, y1) = pts[0], pts[1]
        label = None
        for t in (0.5, 0.38, 0.62, 0.28, 0.72):
            at = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
            if label is None:
                label = ax.text(*at, e.relation, ha="center", va="center", fontsize=SMALL, color="#111827",
                                zorder=4, bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#d1d5db", "lw": 0.8})
            else:
                label.set_position(at)
            box = label.get_window_extent(renderer).expanded(1.05, 1.2)
            if not any(box.overlaps(o) for o in placed):
                break
        placed.append(label.get_window_extent(renderer))
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return Path(path)


def log_lineage_picture(store, artifact_id: int, run_id: str, label: str | None = None) -> None:  # noqa: ANN001
    """Draw an artifact's lineage (what it was made from) and attach it to an MLflow run
    (``lineage/lineage.png`` and ``lineage/lineage.mmd``), replacing an earlier drawing."""
    from llmops.registry import lineage

    with store.session() as s:
        g = lineage.graph(s, artifact_id, "up")
    with tempfile.TemporaryDirectory(prefix="llmops-lineage-") as tmp:
        png = lineage_png(g, Path(tmp) / PNG, label)
        (Path(tmp) / MERMAID).write_text(lineage.render_mermaid(g) + "\n")
        store.mlflow.log_artifact(run_id, str(png), ARTIFACT_DIR)
        store.mlflow.log_artifact(run_id, str(Path(tmp) / MERMAID), ARTIFACT_DIR)


def redraw(store, artifact_id: int) -> list[str]:  # noqa: ANN001 - Store
    """Redraw the lineage picture of every model version whose graph an edge into ``artifact_id``
    changed: the artifact's own versions and those of what was made from it (at most
    :data:`MAX_REDRAW`). Returns the runs drawn on; a failure is a warning on stderr."""
    from sqlalchemy import select

    from llmops.registry import lineage
    from llmops.registry.tables import Version

    drawn: list[str] = []
    try:
        with store.session() as s:
            ids = [artifact_id] + [e.child for e in lineage.walk(s, artifact_id, "down")]
            ids = list(dict.fromkeys(ids))
            rows = s.execute(select(Version.artifact_id, Version.name, Version.version, Version.mlflow_run_id)
                             .where(Version.kind == "model", Version.artifact_id.in_(ids),
                                    Version.mlflow_run_id.is_not(None))).all()
        rows = sorted(rows, key=lambda r: (ids.index(r.artifact_id), r.name, r.version))[:MAX_REDRAW]
    except Exception as exc:  # noqa: BLE001
        sys.stderr.write(f"warning: could not redraw the lineage pictures: {exc}\n")
        return drawn
    for r in rows:
        try:
            log_lineage_picture(store, r.artifact_id, r.mlflow_run_id, f"models:/{r.name}/{r.version}")
            drawn.append(r.mlflow_run_id)
        except Exception as exc:  # noqa: BLE001 - a picture never undoes what it pictures
            sys.stderr.write(f"warning: could not draw the lineage picture of models:/{r.name}/{r.version}: {exc}\n")
    return drawn
