"""The Hugging Face GPTQ folder GPTQModel wrote, finished and checked before it is handed out:
float16 for what stays unquantized, the source's tokenizer and generation config byte for byte,
the quantization_config transformers, vLLM and TGI read, and the packed tensors' figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmops.converters.gptq.plan import LayerPlan
from llmops.converters.gptq.sensitivity import modules_in_block_to_quantize
from llmops.core.checkpoint import Checkpoint
from llmops.core.errors import LLMOpsError
from llmops.core.tensorfiles import read_safetensors_header

# Files that make a folder tokenize and generate like its source; copied verbatim.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def quantized_tensor_stats(folder: Path, bits: int) -> tuple[int, int, int]:
    """(bytes of qweight+qzeros+scales+g_idx, weights they encode, modules) from the safetensors headers."""
    per_module: dict[str, dict[str, tuple[tuple[int, ...], int]]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for t in read_safetensors_header(f):
            prefix, _, leaf = t.name.rpartition(".")
            if leaf in ("qweight", "qzeros", "scales", "g_idx"):
                per_module.setdefault(prefix, {})[leaf] = (t.shape, t.nbytes)
    total_bytes = total_params = 0
    for prefix, parts in per_module.items():
        if "qweight" not in parts:
            raise LLMOpsError(f"GPTQ output is incomplete: {prefix} has {sorted(parts)} but no qweight")
        shape, _ = parts["qweight"]
        # qweight packs 32 // bits input rows per int32 word: [in * bits / 32, out]
        in_features = shape[0] * 32 // bits
        total_params += in_features * shape[1]
        total_bytes += sum(nb for _, nb in parts.values())
    return total_bytes, total_params, len(per_module)


def unquantized_module_stats(folder: Path, names: list[str]) -> tuple[int, int]:
    """(bytes, weights) of the decoder modules kept in float16; each must be a plain weight."""
    if not names:
        return 0, 0
    tensors = {t.name: t for f in sorted(folder.glob("*.safetensors")) for t in read_safetensors_header(f)}
    nbytes = params = 0
    for name in names:
        if f"{name}.qweight" in tensors or f"{name}.weight" not in tensors:
            raise LLMOpsError(f"GPTQ output: {name} was to stay in float16 but GPTQModel "
                              f"{'quantized it' if f'{name}.qweight' in tensors else 'did not write it'}")
        t = tensors[f"{name}.weight"]
        nbytes += t.nbytes
        params += t.nbytes // 2
    return nbytes, params


def store_float16(tmp: Path) -> None:
    """Unquantized tensors (embeddings, norms, output head) in float16, and ``dtype`` float16 in config.json.

    Quantization runs in float32 on the CPU for accuracy, so GPTQModel saves the rest of
    the model in float32; GPTQ checkpoints are float16 by convention (vLLM's and TGI's GPTQ
    kernels take float16 activations and read the dtype from config.json), and float32
    would double the size of the embeddings.
    """
    import torch
    from safetensors.torch import load_file, save_file

    for f in sorted(tmp.glob("*.safetensors")):
        tensors = load_file(str(f))
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        out = {}
        for name, t in tensors.items():
            if t.dtype == torch.float32:
                h = t.to(torch.float16)
                if not torch.isfinite(h).all() and torch.isfinite(t).all():
                    raise LLMOpsError(f"tensor {name} does not fit in float16 (largest magnitude "
                                      f"{float(t.abs().max()):.3g})")
                t = h
            out[name] = t.contiguous()
        save_file(out, str(f), metadata={"format": "pt"})
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float16"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def fuse_split_modules(tmp: Path, ckpt: Checkpoint) -> None:
    """Put back the fused ``gate_up_proj`` of a source that has one (Phi-3, Phi-4-mini).

    GPTQModel quantizes such an MLP as two modules, ``gate_proj`` and ``up_proj``, and saves them
    so; the source's own class (``Phi3ForCausalLM``) has one ``gate_up_proj`` and cannot load
    that. Both halves read the same input, so the fused module is the two packed tensors side by
    side along the output axis, gate first (as the source's rows are): ``qweight``, ``qzeros``
    and ``scales`` concatenated on dim 1, the shared ``g_idx`` once. GPTQModel has no option to
    keep the fusion, hence this step."""
    fused = {n[: -len(".gate_up_proj.weight")] for n in ckpt.names() if n.endswith(".gate_up_proj.weight")}
    if not fused:
        return
    import torch
    from safetensors.torch import load_file, save_file

    for f in sorted(tmp.glob("*.safetensors")):
        tensors = load_file(str(f))
        prefixes = {n[: -len(".gate_proj.qweight")] for n in tensors if n.endswith(".gate_proj.qweight")}
        prefixes &= fused
        if not prefixes:
            continue
        for pre in sorted(prefixes):
            gate, up = f"{pre}.gate_proj", f"{pre}.up_proj"
            if f"{up}.qweight" not in tensors:
                raise LLMOpsError(f"GPTQ output: {gate} and {up} are in different files; cannot fuse them "
                                  f"back into {pre}.gate_up_proj")
            g_gate, g_up = tensors.get(f"{gate}.g_idx"), tensors.get(f"{up}.g_idx")
            if (g_gate is None) != (g_up is None) or (g_gate is not None and not torch.equal(g_gate, g_up)):
                raise LLMOpsError(f"GPTQ output: {gate} and {up} have different group orders; "
                                  f"they cannot be fused back into {pre}.gate_up_proj, which the source's "
                                  "class needs")
            for leaf in ("qweight", "qzeros", "scales"):
                tensors[f"{pre}.gate_up_proj.{leaf}"] = torch.cat(
                    [tensors.pop(f"{gate}.{leaf}"), tensors.pop(f"{up}.{leaf}")], dim=1).contiguous()
            if g_gate is not None:
                tensors[f"{pre}.gate_up_proj.g_idx"] = g_gate
                del tensors[f"{gate}.g_idx"], tensors[f"{up}.g_idx"]
            if f"{gate}.bias" in tensors:
                tensors[f"{pre}.gate_up_proj.bias"] = torch.cat(
                    [tensors.pop(f"{gate}.bias"), tensors.pop(f"{up}.bias")]).contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})
    index = tmp / "model.safetensors.index.json"
    if index.is_file():  # a sharded output: the weight map names the fused tensors
        data = json.loads(index.read_text(encoding="utf-8"))
        wm = data.get("weight_map", {})
        for f in sorted(tmp.glob("*.safetensors")):
            for t in read_safetensors_header(f):
                wm[t.name] = f.name
        for name in [n for n in wm if ".gate_proj." in n or ".up_proj." in n]:
            if name.rsplit(".mlp.", 1)[0] + ".mlp" in fused:
                del wm[name]
        index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def finish_folder(tmp: Path, ckpt: Checkpoint, plan: LayerPlan | None = None, kept: list[str] | None = None) -> None:
    """Source tokenizer and generation config verbatim; drop GPTQModel's transient scratch path from the
    config; name the modules that stay unquantized the way transformers reads it."""
    store_float16(tmp)
    fuse_split_modules(tmp, ckpt)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        src = ckpt.root / name
        if src.is_file():
            shutil.copyfile(src, tmp / name)
    for name in ("config.json", "quantize_config.json"):
        p = tmp / name
        if not p.is_file():
            continue
        data = json.loads(p.read_text(encoding="utf-8"))
        qc = data.get("quantization_config", data) if name == "config.json" else data
        meta = qc.get("meta") if isinstance(qc, dict) else None
        if isinstance(meta, dict):
            meta.pop("offload_to_disk_path", None)
        if kept and plan is not None and isinstance(qc, dict):
            # transformers (through optimum) builds a GPTQ kernel for every linear module it is
            # not told to skip; GPTQModel's negative ``dynamic`` entries are not read there
            qc["modules_in_block_to_quantize"] = modules_in_block_to_quantize(
                list(plan.widths), plan.n_layers, _layers_name(kept[0]), kept)
        p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def check_output(tmp: Path, bits: int, group: int) -> None:
    try:
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LLMOpsError(f"GPTQModel wrote no readable config.json ({e})") from None
    qc = cfg.get("quantization_config") or {}
    got = (qc.get("quant_method"), qc.get("checkpoint_format") or qc.get("format"), qc.get("bits"),
           qc.get("group_size"))
    if got != ("gptq", "gptq", bits, group):
        raise LLMOpsError(f"GPTQModel wrote an unexpected quantization_config {got}; expected "
                          f"('gptq', 'gptq', {bits}, {group})")


def _layers_name(module: str) -> str:
    """``model.layers.11.mlp.down_proj`` -> ``layers``."""
    parts = module.split(".")
    i = next(k for k, p in enumerate(parts) if p.isdecimal())
    return parts[i - 1]
