"""What an ONNX folder may ask of onnxruntime and onnxruntime-genai before either opens it.

onnxruntime-genai 0.18 does what ``genai_config.json`` says: a ``custom_ops_library`` under any
``session_options`` is dlopen()ed (its constructors run before anything can object, and 0.18 only
asks that it lie in the model folder), execution-provider options name backend libraries (QNN's
``backend_path``) or raw pointers (CUDA's ``user_compute_stream``, ``gpu_external_alloc``),
``enable_profiling`` writes files, session config entries redirect the external weights
(``session.model_external_initializers_file_folder_path``) or write compiled models
(``ep.context_file_path``), and file names (``tokenizer_dir`` among them) are joined to the folder
as written, through symbolic links. A registered folder's bytes are the hashed ones, so the sha256
check says nothing about what they ask for: every ONNX load (serving, latency, the logits runner of
accuracy and verification) reads the file through :func:`check_folder` first.

Settings are allowed by name (what the model builder writes plus plain tuning knobs); anything
else that onnxruntime would act on is refused with the key's path. Every file name must resolve,
symbolic links followed, inside the folder. The graphs' external-data ``location`` entries need no
check here: onnxruntime 1.32 (pinned) refuses absolute ones and any that resolve outside the
graph's folder, symbolic links included, for both runtimes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from llmops.core.errors import LLMOpsError

CONFIG_NAME = "genai_config.json"

# top-level sections onnxruntime-genai reads; all but "model" hold only numbers and flags
SECTIONS = ("model", "search", "speculative", "engine")

# session_options keys onnxruntime-genai maps to SessionOptions calls that touch no file
SESSION_KEYS = frozenset({
    "log_id", "intra_op_num_threads", "inter_op_num_threads", "log_severity_level", "log_verbosity_level",
    "enable_cpu_mem_arena", "enable_mem_pattern", "graph_optimization_level", "provider_options",
})

# every other session_options key becomes an onnxruntime AddConfigEntry; these name no file or
# library (the first three are what the model builder of 0.18 writes)
SESSION_CONFIG_ENTRIES = frozenset({
    "ep.cuda.fpa_intb_gemm",
    "optimization.disable_specified_optimizers",
    "session.use_device_allocator_for_initializers",
    "optimization.enable_gelu_approximation",
    "session.intra_op.allow_spinning",
    "session.inter_op.allow_spinning",
    "session.force_spinning_stop",
    "session.disable_prepacking",
    "session.set_denormal_as_zero",
    "session.disable_cpu_ep_fallback",
    "session.disable_quant_qdq",
    "session.enable_quant_qdq_cleanup",
    "session.disable_double_qdq_remover",
    "session.disable_aot_function_inlining",
    "session.qdq_matmulnbits_accuracy_level",
    "session.dynamic_block_base",
    "session.intra_op_thread_affinities",
    "session.use_env_allocators",
    "mlas.enable_gemm_fastmath_arm64_bfloat16",
})

# run_options entries (onnxruntime AddConfigEntry on each run) that name no file
RUN_OPTIONS = frozenset({
    "gpu_graph_id", "memory.enable_memory_arena_shrinkage", "disable_synchronize_execution_providers",
})

# execution providers llmops runs and the options of each that name no file, library or pointer
PROVIDER_OPTIONS: dict[str, frozenset[str]] = {
    "cpu": frozenset(),
    "cuda": frozenset({
        "device_id", "enable_cuda_graph", "enable_skip_layer_norm_strict_mode", "use_tf32", "prefer_nhwc",
        "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search", "do_copy_in_default_stream",
        "cudnn_conv_use_max_workspace", "cudnn_conv1d_pad_to_nc1d", "tunable_op_enable",
        "tunable_op_tuning_enable", "tunable_op_max_tuning_duration_ms", "fuse_conv_bias", "sdpa_kernel",
        "use_ep_level_unified_stream",
    }),
}
DEVICE_FILTER_KEYS = frozenset({"hardware_device_type", "hardware_device_id", "hardware_vendor_id"})

_PATH_KEY = re.compile(r"(^|_)(filename|file|dir|path|folder)$")
_NATIVE_KEY = re.compile(r"librar|(^|_)(lib|so|dll|dylib)$")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the keys it saw more than once: onnxruntime-genai acts on
    every occurrence, Python's json keeps the last, so a repeated key could hide one from the check."""

    repeated: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    obj.repeated = []
    for k, v in pairs:
        if k in obj:
            obj.repeated.append(k)
        obj[k] = v
    return obj


def _key_path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z0-9_]+", p):
            out += f".{p}" if out else p
        else:
            out += f"[{json.dumps(p)}]"
    return out


class _Checker:
    def __init__(self, folder: Path, cfg: Path) -> None:
        self.root = Path(os.path.realpath(folder))
        self.cfg = cfg

    def refuse(self, parts: list[str | int], reason: str) -> LLMOpsError:
        return LLMOpsError(f"{self.cfg}: {_key_path(parts)} {reason}; refusing to load it")

    # -- structure ---------------------------------------------------------------------------
    def scan(self, node: Any, parts: list[str | int]) -> None:
        """Repeated keys and NUL characters anywhere (C++ reads a string up to its first NUL)."""
        if isinstance(node, dict):
            if getattr(node, "repeated", None):
                raise self.refuse([*parts, node.repeated[0]], "appears more than once in its object")
            for k, v in node.items():
                if "\x00" in k:
                    raise self.refuse([*parts, k], "holds a NUL character")
                self.scan(v, [*parts, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self.scan(v, [*parts, i])
        elif isinstance(node, str) and "\x00" in node:
            raise self.refuse(parts, "holds a NUL character")

    def top(self, config: Any) -> None:
        if not isinstance(config, dict):
            raise LLMOpsError(f"{self.cfg}: not a JSON object; refusing to load it")
        for key, value in config.items():
            if key not in SECTIONS:
                raise self.refuse([key], f"is not a section llmops allows (only {', '.join(SECTIONS)})")
            if key == "model":
                if not isinstance(value, dict):
                    raise self.refuse([key], "is not an object")
                self.model(value, [key])
            else:
                self.numbers(value, [key])

    def numbers(self, node: Any, parts: list[str | int]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                self.numbers(v, [*parts, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                self.numbers(v, [*parts, i])
        elif isinstance(node, str):
            raise self.refuse(parts, "is text where onnxruntime-genai reads only numbers and flags")

    # -- model ---------------------------------------------------------------------------------
    def model(self, node: dict[str, Any], parts: list[str | int]) -> None:
        for key, value in node.items():
            here = [*parts, key]
            if _NATIVE_KEY.search(key.lower()):
                raise self.refuse(here, "loads native code")
            if key == "session_options":
                self.session(value, here)
            elif key == "run_options":
                self.run_options(value, here)
            elif _PATH_KEY.search(key):
                self.inside(value, here)
            else:
                self.model_value(value, here)

    def model_value(self, value: Any, parts: list[str | int]) -> None:
        if isinstance(value, dict):
            self.model(value, parts)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self.model_value(item, [*parts, i])
        elif isinstance(value, str) and _escapes(value):
            # tensor and type names never look like this; a path under a key this check does not know does
            raise self.refuse(parts, "looks like a path out of the model folder")

    def inside(self, value: Any, parts: list[str | int]) -> None:
        if not isinstance(value, str):
            raise self.refuse(parts, "must be a file name inside the model folder")
        reason = outside_reason(self.root, value)
        if reason:
            raise self.refuse(parts, reason)

    # -- onnxruntime settings ----------------------------------------------------------------------
    def session(self, node: Any, parts: list[str | int]) -> None:
        if not isinstance(node, dict):
            raise self.refuse(parts, "is not an object")
        for key, value in node.items():
            here = [*parts, key]
            if key == "custom_ops_library" or _NATIVE_KEY.search(key.lower()):
                raise self.refuse(here, "loads native code")
            if key == "enable_profiling":
                raise self.refuse(here, "writes profiling files")
            if key == "provider_options":
                self.providers(value, here)
            elif key in SESSION_KEYS or key in SESSION_CONFIG_ENTRIES:
                if isinstance(value, dict | list):
                    raise self.refuse(here, "must be a single value")
            elif re.search(r"file|path|folder|dir|context", key):
                raise self.refuse(here, "makes onnxruntime read or write files by name")
            else:
                raise self.refuse(here, "is not an onnxruntime session setting llmops allows in a model folder")

    def run_options(self, node: Any, parts: list[str | int]) -> None:
        if not isinstance(node, dict):
            raise self.refuse(parts, "is not an object")
        for key, value in node.items():
            here = [*parts, key]
            if key == "enable_profiling":
                raise self.refuse(here, "writes profiling files")
            if key not in RUN_OPTIONS or isinstance(value, dict | list):
                raise self.refuse(here, "is not an onnxruntime run setting llmops allows in a model folder")

    def providers(self, node: Any, parts: list[str | int]) -> None:
        if not isinstance(node, list):
            raise self.refuse(parts, "is not a list")
        for i, entry in enumerate(node):
            if not isinstance(entry, dict):
                raise self.refuse([*parts, i], "is not an object")
            for name, options in entry.items():
                here = [*parts, i, name]
                norm = name.lower()
                norm = norm[: -len("executionprovider")] if norm.endswith("executionprovider") else norm
                if norm not in PROVIDER_OPTIONS:
                    allowed = " and ".join(PROVIDER_OPTIONS)
                    raise self.refuse(here, "is an execution provider llmops does not load (its options can name "
                                            f"native libraries and files); only {allowed} are allowed")
                if not isinstance(options, dict):
                    raise self.refuse(here, "is not an object")
                for opt, value in options.items():
                    where = [*here, opt]
                    if opt == "device_filtering_options" and isinstance(value, dict):
                        bad = sorted(set(value) - DEVICE_FILTER_KEYS)
                        if bad:
                            raise self.refuse([*where, bad[0]], "is not a device filter llmops allows")
                        self.numbers({k: v for k, v in value.items() if k != "hardware_device_type"}, where)
                    elif opt not in PROVIDER_OPTIONS[norm] or isinstance(value, dict | list):
                        reason = ("loads native code" if _NATIVE_KEY.search(opt.lower()) or "backend" in opt.lower()
                                  else f"is not a {norm} provider option llmops allows (it may name files, "
                                       "libraries or memory addresses)")
                        raise self.refuse(where, reason)


def _escapes(value: str) -> bool:
    return value.startswith(("/", "\\")) or bool(_DRIVE.match(value)) or ".." in re.split(r"[/\\]", value)


def outside_reason(root: Path, name: str) -> str | None:
    """Why ``name`` (relative to the folder ``root``, already resolved) does not stay inside it;
    None when it does. Symbolic links are followed, as the runtimes do."""
    if "\x00" in name:
        return "holds a NUL character"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return f"is an absolute path ({name}); a model folder's files must lie inside it"
    if ".." in re.split(r"[/\\]", name):
        return f"climbs out of the model folder ({name})"
    target = Path(os.path.realpath(root / name))
    if target != root and root not in target.parents:
        return f"resolves outside the model folder through a symbolic link ({name} -> {target})"
    return None


def check_file(folder: str | Path, name: str) -> Path:
    """``folder/name``, refused (one line) unless it resolves inside the folder."""
    folder = Path(folder)
    reason = outside_reason(Path(os.path.realpath(folder)), name)
    if reason:
        raise LLMOpsError(f"{folder / name}: {reason}; refusing to load it")
    return folder / name


def check_folder(folder: str | Path, *, required: bool = True) -> dict[str, Any]:
    """The folder's ``genai_config.json``, parsed, once every setting in it is one llmops allows
    onnxruntime and onnxruntime-genai to act on; ``{}`` for a folder without one when not ``required``.
    Raises a one-line LLMOpsError naming the key path of the first setting refused."""
    folder = Path(folder)
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        if required:
            raise LLMOpsError(f"{folder} has no {CONFIG_NAME}: not an onnxruntime-genai folder")
        return {}
    if outside_reason(Path(os.path.realpath(folder)), CONFIG_NAME):
        raise LLMOpsError(f"{cfg}: resolves outside the model folder through a symbolic link; refusing to load it")
    try:
        config = json.loads(cfg.read_bytes().decode("utf-8"), object_pairs_hook=_object)
    except (ValueError, UnicodeDecodeError) as e:
        raise LLMOpsError(f"{cfg}: not valid JSON ({e})") from None
    checker = _Checker(folder, cfg)
    checker.scan(config, [])
    checker.top(config)
    return config


def decoder_graph(folder: str | Path, config: dict[str, Any]) -> Path | None:
    """The decoder graph a checked config names (``model.decoder.filename``), None if it names none."""
    decoder = config.get("model", {}).get("decoder", {}) if isinstance(config.get("model"), dict) else {}
    name = decoder.get("filename") if isinstance(decoder, dict) else None
    return Path(folder) / name if isinstance(name, str) and name else None
