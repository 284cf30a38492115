"""Lineage: where an artifact came from (up) and what was made from it (down).

One recursive CTE walks the edge table; it is portable SQL (SQLite and
PostgreSQL both run it) and indexed on both edge ends, so depth, not table
size, decides its cost. Cycles cannot loop forever: the walk is depth-bounded, and it meets
each edge once per distance (UNION), however many paths lead there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, literal, select
from sqlalchemy.orm import Session

from llmops.registry.tables import Artifact, LineageEdge, Version

MAX_DEPTH = 64


@dataclass
class Node:
    id: int
    kind: str
    name: str
    labels: list[str]
    sha256: str
    format: str | None
    quant: str | None
    uri: str


@dataclass
class Edge:
    parent: int
    child: int
    relation: str
    depth: int
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    root: int
    direction: str
    nodes: dict[int, Node]
    edges: list[Edge]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "direction": self.direction,
            "nodes": [asdict(n) for n in self.nodes.values()],
            "edges": [asdict(e) for e in self.edges],
        }


def walk(session: Session, artifact_id: int, direction: str = "up", max_depth: int = MAX_DEPTH) -> list[Edge]:
    """Edges reachable from ``artifact_id`` towards parents (up) or children (down), each once, at
    its shortest distance.

    The walk carries (edge, next node, depth) only and joins by UNION, which drops a row already
    found: where paths fork and meet again (a model converted two ways, both quantized to the
    same output, and so on down), the walk meets each edge once per distance instead of once per
    path, and a chain of such diamonds costs its edge count, not 2 to the power of its length.
    (Not the edges' parameters, JSON that PostgreSQL cannot compare: they join afterwards.)"""
    e = LineageEdge.__table__
    near, far = (e.c.child_id, e.c.parent_id) if direction == "up" else (e.c.parent_id, e.c.child_id)
    base = select(e.c.id, far.label("next_id"), literal(1).label("depth")).where(near == artifact_id)
    cte = base.cte("lineage_walk", recursive=True)
    step = select(e.c.id, far.label("next_id"), (cte.c.depth + 1).label("depth")).where(
        near == cte.c.next_id, cte.c.depth < max_depth)
    cte = cte.union(step)
    shortest = select(cte.c.id, func.min(cte.c.depth).label("depth")).group_by(cte.c.id).subquery()
    # one round trip: the edges' parameters travel with the walk
    rows = session.execute(select(e.c.parent_id, e.c.child_id, e.c.relation, e.c.parameters, shortest.c.depth)
                           .join(shortest, shortest.c.id == e.c.id)).all()
    edges = [Edge(r.parent_id, r.child_id, r.relation, r.depth, r.parameters or {}) for r in rows]
    return sorted(edges, key=lambda x: (x.depth, x.parent, x.child))


def graph(session: Session, artifact_id: int, direction: str = "up") -> Graph:
    edges = walk(session, artifact_id, direction)
    ids = {artifact_id} | {x.parent for x in edges} | {x.child for x in edges}
    nodes: dict[int, Node] = {}
    labels: dict[int, list[str]] = {}
    a, v = Artifact.__table__, Version.__table__
    # the nodes and their registry names in one query (plain rows: no ORM objects to build)
    q = (select(a.c.id, a.c.kind, a.c.name, a.c.sha256, a.c.format, a.c.quant, a.c.uri, v.c.kind.label("vkind"),
                v.c.name.label("vname"), v.c.version)
         .outerjoin(v, v.c.artifact_id == a.c.id).where(a.c.id.in_(ids)))
    for r in session.execute(q):
        if r.vname is not None:
            scheme = {"model": "models", "prompt": "prompts", "dataset": "datasets"}.get(r.vkind, r.vkind)
            labels.setdefault(r.id, []).append(f"{scheme}:/{r.vname}/{r.version}")
        nodes[r.id] = Node(r.id, r.kind, r.name, [], r.sha256, r.format, r.quant, r.uri)
    for node_id, node in nodes.items():
        node.labels = sorted(labels.get(node_id, []))
    return Graph(artifact_id, direction, nodes, edges)


def _label(n: Node) -> str:
    what = n.labels[0] if n.labels else n.name
    fmt = "/".join(x for x in (n.format, n.quant) if x and x not in ("none", n.kind))
    return f"{what} [{n.kind}{', ' + fmt if fmt else ''}] sha256:{n.sha256[:12]}"


def render_tree(g: Graph) -> str:
    children: dict[int, list[Edge]] = {}
    for e in g.edges:
        src = e.child if g.direction == "up" else e.parent
        children.setdefault(src, []).append(e)
    lines = [_label(g.nodes[g.root])]
    arrow = "<-" if g.direction == "up" else "->"

    def rec(node: int, prefix: str, path: set[int]) -> None:
        kids = children.get(node, [])
        for i, e in enumerate(kids):
            nxt = e.parent if g.direction == "up" else e.child
            last = i == len(kids) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{arrow} {e.relation}: {_label(g.nodes[nxt])}")
            if nxt not in path:
                rec(nxt, prefix + ("    " if last else "│   "), path | {nxt})

    rec(g.root, "", {g.root})
    if len(lines) == 1:
        lines.append(f"(no {'parents' if g.direction == 'up' else 'children'} recorded)")
    return "\n".join(lines)


def _esc(text: str) -> str:
    return text.replace('"', "'")


def render_mermaid(g: Graph) -> str:
    out = ["graph BT" if g.direction == "up" else "graph TD"]
    for n in g.nodes.values():
        out.append(f'  a{n.id}["{_esc(_label(n))}"]')
    for e in g.edges:
        out.append(f"  a{e.parent} -->|{e.relation}| a{e.child}")
    return "\n".join(out)


def render_dot(g: Graph) -> str:
    out = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica"];']
    for n in g.nodes.values():
        out.append(f'  a{n.id} [label="{_esc(_label(n))}"];')
    for e in g.edges:
        out.append(f'  a{e.parent} -> a{e.child} [label="{e.relation}"];')
    out.append("}")
    return "\n".join(out)
