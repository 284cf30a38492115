"""The pictures the MLflow UI shows: the lineage graph (readable, redrawn whenever an edge is
added to a version) and the size/accuracy/speed plot (labels clear of each other and the title)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _graph():  # noqa: ANN202 - a q4 made from a source, both evaluated on one text, calibrated, with a prompt
    from llmops.registry.lineage import Edge, Graph, Node

    def node(i: int, kind: str, label: str, fmt: str | None, quant: str | None) -> Node:
        return Node(i, kind, label.rsplit("/", 2)[-2], [label], f"{i:02x}" * 32, fmt, quant, f"file:///{i}")

    nodes = {1: node(1, "model", "models:/smollm2-135m-gguf-q4/1", "gguf", "Q4_K_M"),
             2: node(2, "checkpoint", "models:/smollm2-135m/1", "safetensors", "F32"),
             3: node(3, "dataset", "datasets:/wikitext-2-raw-test/1", "text", None),
             4: node(4, "dataset", "datasets:/calibration/1", "text", None),
             5: node(5, "prompt", "prompts:/assistant/2", "prompt", None)}
    edges = [Edge(2, 1, "converted_from", 1), Edge(3, 1, "evaluated_on", 1), Edge(4, 1, "calibrated_with", 1),
             Edge(5, 1, "uses_prompt", 1), Edge(3, 2, "evaluated_on", 2)]
    return Graph(1, "up", nodes, edges)


def test_lineage_layout_is_readable_at_the_artifact_viewers_size(tmp_path) -> None:
    from llmops.registry import pictures

    g = _graph()
    lay = pictures._layout(g)
    boxes = list(lay.boxes.values())
    # every box apart from every other
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert abs(a.x - b.x) >= pictures.BOX_W or abs(a.y - b.y) >= pictures.BOX_H, (a.node.name, b.node.name)
    # parents above children; the text that evaluated both sits above the source, and its edge to
    # the q4 passes the source's row through a slot of its own, clear of every box in that row
    assert all(lay.boxes[e.parent].y > lay.boxes[e.child].y for e in g.edges)
    assert lay.boxes[3].row == 0 and lay.boxes[2].row == 1 and lay.boxes[1].row == 2
    (skip,) = [i for i, e in enumerate(g.edges) if e.parent == 3 and e.child == 1]
    (x, _), _ = lay.routes[skip]
    assert all(abs(x - b.x) > pictures.BOX_W / 2 for b in boxes if b.row == 1)
    # each box: kind, name/version, format/quant, the first 8 hex digits of the sha256
    assert pictures.node_lines(g.nodes[1]) == ["MODEL", "models:/smollm2-135m-gguf-q4/1", "gguf · Q4_K_M",
                                               "sha256 01010101"]
    assert pictures.node_lines(g.nodes[3])[1:] == ["datasets:/wikitext-2-raw-test/1", "text", "sha256 03030303"]
    # sized from the graph: three boxes a row at most, so 12-point text shown 800 px wide stays
    # at least 11 px high
    png = pictures.lineage_png(g, tmp_path / "lineage.png")
    width, height = _png_size(png)
    assert width == pytest.approx(lay.width * pictures.DPI, abs=2) and height == pytest.approx(lay.height * 100, abs=2)
    assert pictures.FONT * pictures.DPI / 72 * min(1.0, 800 / width) >= 11
    lone = pictures.lineage_png(type(g)(1, "up", {1: g.nodes[1]}, []), tmp_path / "lone.png")
    assert _png_size(lone)[0] <= 800


def _rows(n: int) -> list[dict]:
    """A crowd: n versions within a few MiB and a hundredth of perplexity, one holding @production."""
    rows = [{"label": f"smollm2-135m-gguf-q{i}/1", "file_mb": 100 + i * 0.4, "ppl": 19.0 + i * 0.01,
             "decode_tps": 200 + i, "aliases": ["production"] if i == 2 else []} for i in range(n)]
    rows.append({"label": "smollm2-135m/1", "file_mb": 513.0, "ppl": 18.2, "decode_tps": 60, "aliases": []})
    return rows


@pytest.mark.parametrize("n", [1, 3, 6])
def test_tradeoff_labels_clear_each_other_and_the_title(tmp_path, n) -> None:
    from matplotlib.text import Text

    from llmops.benchmarks.bench import tradeoff_figure, tradeoff_plot

    rows = _rows(n)
    fig = tradeoff_figure(rows)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    title = ax.title.get_window_extent(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    area = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert not a.overlaps(title) and not a.overlaps(legend), labels[i].get_text()
        assert area.x0 <= a.x0 and a.x1 <= area.x1 and area.y0 <= a.y0 and a.y1 <= area.y1, labels[i].get_text()
        for j, b in enumerate(boxes[i + 1:], i + 1):
            assert not a.overlaps(b), (labels[i].get_text(), labels[j].get_text())
    # every point is named, by its label or by a number spelled out under the plot; the holder as @production
    named = " ".join(t.get_text() for t in fig.texts + labels)
    for r in rows:
        assert r["label"] in named
    assert "@production" in named if n > 2 else True
    import matplotlib.pyplot as plt

    plt.close(fig)
    out = tradeoff_plot(rows, tmp_path / "plot.png")
    assert out.stat().st_size > 10_000


def _artifact(store, run_id: str, path: str, tmp: Path) -> bytes:  # noqa: ANN001
    return Path(store.mlflow.download_artifacts(run_id, path, str(tmp))).read_bytes()


def test_bench_redraws_the_lineage_picture_and_logs_to_the_logged_model(store_env, cli, tiny_models, eval_text_path,
                                                                         tmp_path) -> None:
    from llmops.app.converting import convert

    gguf = convert(tiny_models("llama"), "gguf-q8_0", tmp_path / "tiny-q8.gguf", verify=False).output
    r = cli("--json", "models", "register", gguf, "--name", "pictured")
    assert r.code == 0, r.err
    run_id = r.json()["run_id"]
    store = store_env.store()
    before_png = _artifact(store, run_id, "lineage/lineage.png", tmp_path / "a")
    before_mmd = _artifact(store, run_id, "lineage/lineage.mmd", tmp_path / "a").decode()
    assert "evaluated_on" not in before_mmd

    b = cli("--json", "bench", "models:/pictured/1", "--metrics", "accuracy", "--chunks", "1", "--eval-text",
            eval_text_path, "--threads", "2")
    assert b.code == 0, b.err
    after_mmd = _artifact(store, run_id, "lineage/lineage.mmd", tmp_path / "b").decode()
    assert "-->|evaluated_on|" in after_mmd and "datasets:/wikitext-2-raw-test/1" in after_mmd
    assert _artifact(store, run_id, "lineage/lineage.png", tmp_path / "b") != before_png

    # the figures on the version's LoggedModel, with the dataset they were measured on
    from llmops.registry.logged_models import VERSION_TAG

    lm = store.mlflow.get_logged_model(store.mlflow.get_model_version("pictured", "1").tags[VERSION_TAG])
    ppl = [m for m in lm.metrics if m.key == "bench.ppl"]
    assert len(ppl) == 1 and ppl[0].value == pytest.approx(b.json()["rows"][0]["ppl"])
    assert ppl[0].dataset_name == "wikitext-2-raw-test" and len(ppl[0].dataset_digest) == 12
    size = [m for m in lm.metrics if m.key == "bench.file_mb"]
    assert size and size[0].dataset_name is None  # a file's size is not measured on data
    assert lm.tags["llmops.protocol.bench.ppl"].startswith("bench ppl, 1 chunks x 512")


def test_promotion_with_a_prompt_redraws_the_picture(store_env, cli, tmp_path) -> None:
    f = tmp_path / "m.bin"
    f.write_bytes(b"m" * 500)
    run_id = cli("--json", "models", "register", f, "--name", "prompted").json()["run_id"]
    assert cli("prompts", "add", "greeting", "--template", "Hello {{name}}").code == 0
    assert cli("promote", "prompted", "1", "--prompt", "prompts:/greeting/1").code == 0
    mmd = _artifact(store_env.store(), run_id, "lineage/lineage.mmd", tmp_path).decode()
    assert "-->|uses_prompt|" in mmd and "prompts:/greeting/1" in mmd
