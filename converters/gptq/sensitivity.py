"""Which linear modules GPTQ would damage most, found before quantizing, so they stay in float16.

A few modules of a small model carry activation outliers (SmolLM2-135M: the ``down_proj`` of
layers 11, 28 and 29, whose GPTQ loss is 10-40x that of any other module); quantizing them to
4 bits costs more accuracy than every other module together. The pass here scores every module
by the error plain rounding would add to its output on the calibration activations, the measure
llama.cpp's importance matrix weights its quantizer with:

    score(W) = sum_j E[x_j^2] * sum_i (W_ij - Q(W)_ij)^2

with E[x_j^2] the mean square of input column j over the calibration tokens and Q the same
grid GPTQ uses (bits, group size, symmetric or not). On SmolLM2 its ranking of the worst modules
is GPTQModel's own loss ranking. A module is kept when its score is at least ``factor`` times
the median score of the modules of its kind (the same projection in every layer), the worst
first, until ``max_fraction`` of the quantized weights are kept.

Kept modules are written unquantized, which is what the standard GPTQ layout can express
(``modules_in_block_to_quantize`` for transformers and optimum, GPTQModel's negative
``dynamic`` entries for GPTQModel and vLLM); a per-module bit width (GPTQModel's positive
``dynamic``) would be smaller but transformers loads every module at the one ``bits``.
GPTQModel has no such pass of its own, hence this module.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_FACTOR = 50.0
DEFAULT_MAX_FRACTION = 0.05

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleScore:
    name: str  # full module name in the model, e.g. model.layers.11.mlp.down_proj
    score: float
    params: int

    @property
    def kind(self) -> str:
        """The same projection in every layer: the name without its layer index."""
        return _LAYER_INDEX.sub(".#.", self.name, count=1)


def pick_outliers(scores: Sequence[ModuleScore], factor: float = DEFAULT_FACTOR,
                  max_fraction: float = DEFAULT_MAX_FRACTION) -> list[ModuleScore]:
    """The modules to keep, worst first (see the module docstring)."""
    by_kind: dict[str, list[float]] = {}
    for s in scores:
        by_kind.setdefault(s.kind, []).append(s.score)
    medians = {k: statistics.median(v) for k, v in by_kind.items()}
    budget = max_fraction * sum(s.params for s in scores)
    out: list[ModuleScore] = []
    used = 0
    for s in sorted(scores, key=lambda s: s.score / max(medians[s.kind], 1e-30), reverse=True):
        if s.score < factor * medians[s.kind] or len(by_kind[s.kind]) < 3:
            continue
        if used + s.params > budget:
            continue
        out.append(s)
        used += s.params
    return sorted(out, key=lambda s: s.score, reverse=True)


def rounding_error(weight: Any, energy: Any, bits: int, group_size: int, sym: bool) -> float:
    """``sum_j energy_j * sum_i (W_ij - Q(W)_ij)^2`` for the grid GPTQ rounds to (torch tensors)."""
    import torch

    w = weight.detach().to(torch.float64)
    out_f, in_f = w.shape
    g = in_f if group_size <= 0 else group_size
    wg = w.reshape(out_f, in_f // g, g)
    maxq = 2 ** bits - 1
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    if sym:
        amax = torch.maximum(lo.abs(), hi)
        scale = (2 * amax / maxq).clamp(min=1e-12)
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = ((hi - lo) / maxq).clamp(min=1e-12)
        zero = torch.round(-lo / scale)
    q = (torch.clamp(torch.round(wg / scale) + zero, 0, maxq) - zero) * scale
    err = (wg - q).reshape(out_f, in_f).pow(2).sum(0)
    return float((err * energy.to(torch.float64)).sum())


def score_modules(model: Any, samples: Iterable[Sequence[int]], module_names: Sequence[str], bits: int,
                  group_size: int, sym: bool, progress: Callable[[str], None] | None = None) -> list[ModuleScore]:
    """Run ``samples`` through ``model`` (a transformers causal LM) once, with hooks summing x² of
    every named module's input, and score each module."""
    import torch

    modules = dict(model.named_modules())
    sums: dict[str, list[Any]] = {}
    hooks = []

    def hook(name: str) -> Callable[..., None]:
        def collect(_mod: Any, inputs: tuple[Any, ...], _out: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            acc = sums.setdefault(name, [torch.zeros(x.shape[-1], dtype=torch.float64), 0])
            acc[0] += (x * x).sum(0)
            acc[1] += x.shape[0]
        return collect

    for name in module_names:
        hooks.append(modules[name].register_forward_hook(hook(name)))
    device = next(model.parameters()).device
    tokens = 0
    try:
        with torch.inference_mode():
            for ids in samples:
                model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
                tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for name in module_names:
        if name not in sums:
            continue
        total, count = sums[name]
        weight = modules[name].weight
        out.append(ModuleScore(name, rounding_error(weight, (total / max(count, 1)).cpu(), bits, group_size, sym),
                               int(weight.numel())))
    if progress:
        progress(f"sensitivity: {len(out)} modules scored on {tokens} calibration tokens")
    return out


def decoder_modules(model: Any, n_layers: int, kinds: Sequence[str]) -> tuple[str, list[str]]:
    """(the block list's own name, full names of the ``kinds`` in every block of ``model``)."""
    import torch

    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers and n_layers > 0:
            present = dict(model.named_modules())
            names = [f"{path}.{i}.{k}" for i in range(n_layers) for k in kinds]
            return path.rsplit(".", 1)[-1], [n for n in names if n in present]
    return "layers", []


def dynamic_skips(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """GPTQModel ``dynamic`` entries that leave these modules unquantized (matched from the name's start)."""
    return {"-:^(?:.*\\.)?" + re.escape(_from_layers(n)) + "$": {} for n in names}


def modules_in_block_to_quantize(kinds: Sequence[str], n_layers: int, layers_prefix: str,
                                 kept: Iterable[str]) -> list[list[str]]:
    """optimum's ``modules_in_block_to_quantize`` (which transformers reads): every module kind,
    except that a kind with kept modules is listed per layer, without the kept ones. optimum
    keeps a module quantized when its name ends with one of the entries."""
    kept_rel = {_from_layers(n) for n in kept}
    groups: list[list[str]] = []
    for kind in kinds:
        per_layer = [f"{layers_prefix}.{i}.{kind}" for i in range(n_layers)]
        if any(p in kept_rel for p in per_layer):
            groups.append([p for p in per_layer if p not in kept_rel])
        else:
            groups.append([kind])
    return [g for g in groups if g]


def _from_layers(name: str) -> str:
    """``model.layers.11.mlp.down_proj`` -> ``layers.11.mlp.down_proj``: from the block list's own name."""
    m = _LAYER_INDEX.search(name)
    if not m:
        return name
    head = name[: m.start()]
    return name[head.rfind(".") + 1:] if "." in head else name
