"""What a file or folder is (format, quant, bits per weight), read from its headers only.

The registry stores these as plain strings; the knowledge of file formats
lives here, next to the converters, so the registry stays format-agnostic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_DTYPE_BITS = {"float32": 32, "F32": 32, "float16": 16, "F16": 16, "bfloat16": 16, "BF16": 16, "int8": 8, "I8": 8}
_DTYPE_QUANT = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class Info:
    format: str
    quant: str | None
    bits_per_weight: float | None = None


def _safetensors_bits(files: list[Path]) -> float | None:
    """Average bits per stored element, from the safetensors headers (no tensor data read)."""
    from llmops.core.errors import LLMOpsError
    from llmops.core.tensorfiles import read_safetensors_header

    try:
        infos = [t for f in files for t in read_safetensors_header(f)]
    except LLMOpsError:
        return None
    total_elems = sum(t.numel for t in infos)
    return 8.0 * sum(t.nbytes for t in infos) / total_elems if total_elems else None


def is_gguf(path: str | Path) -> bool:
    """A file that starts with GGUF's magic (the first four bytes, "GGUF")."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:  # a folder, or unreadable: not a GGUF file
        return False


def _gguf_info(path: Path) -> Info:
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    ftype = None
    field = reader.fields.get("general.file_type")
    if field is not None:
        ftype = int(field.parts[field.data[0]][0])
    quant = None
    if ftype is not None:
        try:
            quant = LlamaFileType(ftype).name.replace("MOSTLY_", "").replace("ALL_", "")
        except ValueError:
            quant = str(ftype)
    elems = sum(int(t.n_elements) for t in reader.tensors)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    return Info("gguf", quant, round(8.0 * nbytes / elems, 4) if elems else None)


def describe(path: str | Path) -> Info:
    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            try:
                return _gguf_info(p)
            except Exception as e:  # noqa: BLE001 - gguf-py raises anything from struct to numpy errors
                from llmops.core.errors import LLMOpsError

                raise LLMOpsError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        if suffix == ".safetensors":
            bits = _safetensors_bits([p])
            return Info("safetensors", {32: "F32", 16: "F16"}.get(round(bits or 0)), bits)
        if suffix in (".pth", ".pt", ".bin"):
            return Info("pytorch", None, None)
        if suffix == ".onnx":
            return Info("onnx", None, None)
        return Info(suffix.lstrip(".") or "file", None, None)
    if not p.is_dir():
        return Info("unknown", None, None)
    config = {}
    if (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = {}
    if (p / "genai_config.json").is_file() or any(p.glob("*.onnx")):
        return Info("onnx", None, None)
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "gptq":
        return Info("gptq", f"{qc.get('bits')}bit", None)
    st = sorted(p.glob("*.safetensors"))
    if st:
        bits = _safetensors_bits(st)
        dtype = config.get("dtype") or config.get("torch_dtype")
        quant = _DTYPE_QUANT.get(str(dtype)) or {32: "F32", 16: "F16"}.get(round(bits or 0))
        return Info("safetensors", quant, round(bits, 4) if bits else None)
    if any(p.glob("*.bin")) or any(p.glob("*.pth")):
        return Info("pytorch", None, None)
    return Info("folder", None, None)
