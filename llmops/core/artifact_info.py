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


# GGUF value types (gguf.GGUFValueType) and the byte sizes of the fixed-size ones
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def scan_gguf(path: Path, keys: tuple[str, ...] = ("general.file_type",)) -> tuple[dict[str, object],
                                                                                   list[tuple[str, int, int]]]:
    """(the scalar or string values of ``keys``, each tensor's (name, elements, ggml type)), read
    from a little-endian GGUF's header by skipping over everything else.

    Written by hand because gguf-py's ``GGUFReader`` builds a numpy view of every item of every
    array on opening: for a 49k-token vocabulary (tokens, types, merges) that is two to four
    seconds, the largest cost of registering a small model, for two numbers. A big-endian file
    (a byte-swapped version field) raises ``ValueError``; the caller falls back to the reader."""
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if not 2 <= version < 0x10000:
            raise ValueError(f"GGUF version {version}: byte-swapped or unknown")
        pos = 24
        u32, u64 = struct.Struct("<I"), struct.Struct("<Q")

        def string(at: int) -> tuple[bytes, int]:
            (n,) = u64.unpack_from(mm, at)
            return mm[at + 8:at + 8 + n], at + 8 + n

        def skip(vtype: int, at: int) -> int:
            if vtype == _GGUF_STRING:
                return at + 8 + u64.unpack_from(mm, at)[0]
            if vtype == _GGUF_ARRAY:
                itype, count = struct.unpack_from("<IQ", mm, at)
                at += 12
                if itype in _GGUF_SCALARS:
                    return at + count * struct.calcsize(_GGUF_SCALARS[itype])
                for _ in range(count):
                    at = skip(itype, at)
                return at
            return at + struct.calcsize(_GGUF_SCALARS[vtype])

        values: dict[str, object] = {}
        alignment = 32  # general.alignment's default
        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = u32.unpack_from(mm, pos)
            pos += 4
            name = key.decode("utf-8", "replace")
            if name == "general.alignment" and vtype == 4:
                alignment = u32.unpack_from(mm, pos)[0] or 32
            if name in keys and vtype in _GGUF_SCALARS:
                values[name] = struct.unpack_from(_GGUF_SCALARS[vtype], mm, pos)[0]
            elif name in keys and vtype == _GGUF_STRING:
                values[name] = string(pos)[0].decode("utf-8", "replace")
            pos = skip(vtype, pos)
        tensors = []
        data_end = 0
        for _ in range(n_tensors):
            tname, pos = string(pos)
            (n_dims,) = u32.unpack_from(mm, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            pos += 4 + 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", mm, pos)
            pos += 12
            elems = 1
            for d in dims:
                elems *= int(d)
            tensors.append((tname.decode("utf-8", "replace"), elems, int(ttype)))
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(ttype))]
            data_end = max(data_end, offset + elems // block * size)
        data_start = -(-pos // alignment) * alignment
        if data_start + data_end > len(mm):
            raise EOFError(f"truncated: its tensors need {data_start + data_end} bytes, the file has {len(mm)}")
    return values, tensors


def _gguf_info(path: Path) -> Info:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, LlamaFileType

    try:
        values, tensors = scan_gguf(path)
        ftype = values.get("general.file_type")
        elems = sum(n for _, n, _ in tensors)
        nbytes = 0
        for _, n, t in tensors:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
            nbytes += n // block * size
    except ValueError:  # big-endian: gguf-py's reader handles it
        reader = GGUFReader(path)
        field = reader.fields.get("general.file_type")
        ftype = int(field.parts[field.data[0]][0]) if field is not None else None
        elems = sum(int(t.n_elements) for t in reader.tensors)
        nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    quant = None
    if ftype is not None:
        try:
            quant = LlamaFileType(int(ftype)).name.replace("MOSTLY_", "").replace("ALL_", "")
        except ValueError:
            quant = str(ftype)
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
