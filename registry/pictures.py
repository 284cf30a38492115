"""Pictures for the MLflow UI: the lineage graph of a version, logged with its run.

Drawn with matplotlib (already in MLflow's stack) in a layered layout: the
version on the right, what it came from to its left, one column per generation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llmops.registry.lineage import Graph, _label


def lineage_png(g: Graph, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = {g.root: 0}
    for e in g.edges:  # edges come sorted by depth from the walk
        far = e.parent if g.direction == "up" else e.child
        depth.setdefault(far, e.depth)
    columns: dict[int, list[int]] = {}
    for node, d in sorted(depth.items(), key=lambda kv: (kv[1], kv[0])):
        columns.setdefault(d, []).append(node)
    ncols = max(columns) + 1
    nrows = max(len(v) for v in columns.values())
    fig, ax = plt.subplots(figsize=(4.2 * ncols + 1, 1.3 * nrows + 1.2), dpi=110)
    pos = {}
    for d, nodes in columns.items():
        x = (ncols - 1 - d) if g.direction == "up" else d
        for i, n in enumerate(nodes):
            pos[n] = (x * 4.2, -(i - (len(nodes) - 1) / 2) * 1.3)
    for e in g.edges:
        if e.parent in pos and e.child in pos:
            (x0, y0), (x1, y1) = pos[e.parent], pos[e.child]
            ax.annotate("", xy=(x1 - 1.4, y1), xytext=(x0 + 1.4, y0),
                        arrowprops={"arrowstyle": "->", "color": "#555"})
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, e.relation, ha="center", fontsize=8, color="#333")
    colours = {"model": "#dbeafe", "checkpoint": "#fef3c7", "dataset": "#dcfce7", "prompt": "#fce7f3"}
    for n, (x, y) in pos.items():
        node = g.nodes.get(n)
        if node is None:
            continue
        text = _label(node).replace(" [", "\n[").replace("] ", "]\n")
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5, wrap=True,
                bbox={"boxstyle": "round,pad=0.4", "fc": colours.get(node.kind, "#eee"),
                      "ec": "#1e3a8a" if n == g.root else "#888", "lw": 2 if n == g.root else 1})
    ax.set_xlim(-2.2, (ncols - 1) * 4.2 + 2.2)
    ax.set_ylim(-(nrows / 2) * 1.3 - 0.4, (nrows / 2) * 1.3 + 0.4)
    ax.axis("off")
    ax.set_title("lineage", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def log_lineage_picture(store, artifact_id: int, run_id: str) -> None:  # noqa: ANN001 - Store
    """Draw the version's lineage and attach it to its MLflow run (``lineage/lineage.png``)."""
    from llmops.registry import lineage

    with store.session() as s:
        g = lineage.graph(s, artifact_id, "up")
    with tempfile.TemporaryDirectory(prefix="llmops-lineage-") as tmp:
        png = lineage_png(g, Path(tmp) / "lineage.png")
        (Path(tmp) / "lineage.mmd").write_text(lineage.render_mermaid(g) + "\n")
        store.mlflow.log_artifact(run_id, str(png), "lineage")
        store.mlflow.log_artifact(run_id, str(Path(tmp) / "lineage.mmd"), "lineage")
