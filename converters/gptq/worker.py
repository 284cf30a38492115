"""The quantization child: load, quantize and save with GPTQModel, reporting progress on stderr.

Run by ``convert.py`` through the core's child protocol (``llmops.core.child``). It is a
separate interpreter because GPTQModel ends the process (``os._exit``) when one of its
worker threads fails, and because it writes to stdout; in the child both are harmless:
the parent relays the progress lines, keeps the rest as a log, turns a crash into a
one-line error, and owns every folder the child writes to, removing them on any failure
(including Ctrl-C, on which it kills the child).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run(job: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """``say`` is the child's reporter: the layers quantized are a phase the parent shows."""
    from llmops.converters.gptq.runtime import LayerProgress, contained_run
    from llmops.core.gptqmodel_env import import_gptqmodel

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
        qc = QuantizeConfig(**common, **({"damp_percent": damp} if damp is not None else {}),
                            mse=float(job.get("mse") or 0.0), **_error_feedback(job))
    hook = LayerProgress(say, job["n_layers"], job["modules_per_layer"])
    kept: list[str] = []
    load_kwargs: dict[str, Any] = {"dtype": torch.float32} if device == "cpu" else {}
    with contained_run(scratch, hook):
        if job["method"] != "rtn" and job.get("keep_outliers"):
            kept = _keep_outliers(qc, json.loads(Path(job["calibration"]).read_text()), job, say)
        say("loading the source model")
        model = GPTQModel.load(job["source"], qc, **load_kwargs)
        with hook.phase("GPTQ" if job["method"] != "rtn" else "RTN"):
            if job["method"] == "rtn":
                model.quantize(None)
            else:
                samples = json.loads(Path(job["calibration"]).read_text())
                data = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in samples]
                model.quantize(data, batch_size=int(job.get("batch_size") or 1), calibration_sort=None)
        say("saving")
        model.save(job["output"])
    used = getattr(model.quantize_config, "damp_percent", None)
    return {"damp": None if job["method"] == "rtn" or used is None else float(used), "losses": hook.losses,
            "kept": kept}


def _error_feedback(job: dict[str, Any]) -> dict[str, Any]:
    """GPTQModel's FOEM/GPTAQ settings: the same GPTQ layout, weights solved with a first-order
    error term (FOEM, ``beta``) and the quantized model's own inputs (GPTAQ, ``alpha``)."""
    from gptqmodel.quantization.config import FOEMConfig, GPTAQConfig

    beta, alpha = float(job.get("foem") or 0.0), float(job.get("gptaq") or 0.0)
    if beta > 0:
        return {"foem": FOEMConfig(alpha=alpha, beta=beta, device=job["device"])}
    if alpha > 0:
        return {"gptaq": GPTAQConfig(alpha=alpha, device=job["device"])}
    return {}


def _keep_outliers(qc: Any, samples: list[list[int]], job: dict[str, Any], say: Callable[[str], None]) -> list[str]:
    """Score the modules on the calibration samples and leave the outliers unquantized
    (``sensitivity.py``) through ``qc.dynamic``. The model is loaded here with transformers and
    freed before GPTQModel loads its own copy: GPTQModel's keeps its layers on the meta device
    until it quantizes them, so no forward pass can run through it."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from llmops.converters.gptq.sensitivity import decoder_modules, dynamic_skips, pick_outliers, score_modules

    say("sensitivity: scoring the linear modules on the calibration samples")
    model = AutoModelForCausalLM.from_pretrained(job["source"], dtype=torch.float32)
    try:
        _, names = decoder_modules(model, job["n_layers"], job["module_kinds"])
        scores = score_modules(model, samples, names, job["bits"], job["group_size"], job["sym"], say)
    finally:
        del model
        gc.collect()
    kept = [s.name for s in pick_outliers(scores)]
    if kept:
        qc.dynamic = {**(qc.dynamic or {}), **dynamic_skips(kept)}
        say(f"sensitivity: keeping {len(kept)} modules in float16: {', '.join(kept)}")
    return kept
