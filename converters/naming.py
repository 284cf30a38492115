"""One naming for every output: gguf-py's model metadata and naming convention
(``SmolLM2-135M-Instruct-Q4_K_M.gguf``, ``SmolLM2-135M-Instruct-onnx-int4``), read from the
checkpoint's config and model card the way llama.cpp's converter reads them."""

from __future__ import annotations

from typing import Any

from llmops.core.checkpoint import Checkpoint


def model_metadata(ckpt: Checkpoint, total_params: int | None = None, shared: int = 0, expert: int = 0,
                   n_expert: int = 0) -> Any:
    """gguf-py's ``Metadata`` of the checkpoint, with its folder's (or file's) name and a size
    label when the model card names neither."""
    import gguf

    total = ckpt.parameter_count() if total_params is None else total_params
    md = gguf.Metadata.load(None, ckpt.root, None, total)
    if md.name is None:
        md.name = ckpt.root.name if ckpt.path.is_dir() else ckpt.path.stem
    if md.size_label is None and total > 0:
        md.size_label = gguf.size_label(total, shared, expert, n_expert)
    return md


def output_stem(md: Any, suffix: str | None) -> str:
    import gguf

    return gguf.naming_convention(md.name, md.basename, md.finetune, md.version, md.size_label, suffix)
