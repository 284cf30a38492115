"""The quantization child: load, quantize and save with GPTQModel, reporting progress on stderr.

Run as ``python -c "from llmops.converters.gptq.worker import main; main(JOB)"`` by
``convert.py``. It is a separate interpreter because GPTQModel ends the process
(``os._exit``) when one of its worker threads fails, and because it writes to
stdout; in the child both are harmless: the parent reads progress lines from the
child's stderr (prefixed with :data:`MARK`), keeps the other lines as a log,
turns a crash into a one-line error, and owns every folder the child writes to,
removing them on any failure (including Ctrl-C, on which it kills the child).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

MARK = "\x1ellmops-gptq\x1e "  # starts a progress line on the child's stderr
_write_lock = threading.Lock()


def say(message: str) -> None:
    """A progress line for the parent; never raises (it may run on a GPTQModel worker thread)."""
    try:
        with _write_lock:
            sys.stderr.write(MARK + " ".join(message.split()) + "\n")
            sys.stderr.flush()
    except Exception:  # noqa: BLE001 - see docstring
        pass


def run(job: dict[str, Any]) -> dict[str, Any]:
    from llmops.converters.gptq.runtime import LayerProgress, contained_run, import_gptqmodel

    import_gptqmodel()
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig, RTNConfig
    from gptqmodel.models.auto import MODEL_MAP

    if job["model_type"] not in MODEL_MAP:
        return {"ok": False, "error": f"architecture {job['architecture']} (model type {job['model_type']!r}) is not "
                                      "supported by GPTQ conversion (GPTQModel has no definition for it)"}
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    scratch = Path(job["scratch"])
    device = job["device"]
    common: dict[str, Any] = {
        "bits": job["bits"], "group_size": job["group_size"], "desc_act": job["act_order"], "sym": job["sym"],
        "device": device, "offload_to_disk_path": str(scratch / "offload"),
    }
    if device == "cpu":
        # "original" packs in plain torch; GPTQModel's default ("cpu") JIT-compiles a C++
        # extension on first use, which costs about a minute on a fresh 2-core machine.
        common["pack_impl"] = "original"
    if job["method"] == "rtn":
        qc = RTNConfig(**common)
    else:
        damp = job.get("damp")
        qc = QuantizeConfig(**common, **({"damp_percent": damp} if damp is not None else {}))
    hook = LayerProgress(say, job["n_layers"], job["modules_per_layer"])
    load_kwargs: dict[str, Any] = {"dtype": torch.float32} if device == "cpu" else {}
    with contained_run(scratch, hook):
        say("loading the source model")
        model = GPTQModel.load(job["source"], qc, **load_kwargs)
        if job["method"] == "rtn":
            model.quantize(None)
        else:
            samples = json.loads(Path(job["calibration"]).read_text())
            data = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in samples]
            model.quantize(data, batch_size=int(job.get("batch_size") or 1), calibration_sort=None)
        say("saving")
        model.save(job["output"])
    used = getattr(model.quantize_config, "damp_percent", None)
    return {"ok": True, "damp": None if job["method"] == "rtn" or used is None else float(used)}


def main(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    try:
        reply = run(job)
    except MemoryError:
        reply = {"ok": False, "error": "out of memory"}
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
        traceback.print_exc(file=sys.stderr)
        reply = {"ok": False, "error": traceback.format_exception_only(type(e), e)[-1].strip()}
    from llmops.benchmarks.procfs import peak_rss

    reply["peak_rss_bytes"] = peak_rss()
    tmp = Path(job["reply"] + ".tmp")
    tmp.write_text(json.dumps(reply))
    os.replace(tmp, job["reply"])
    sys.stderr.flush()
    # GPTQModel's pool threads are not daemons; do not wait for them.
    os._exit(0)
