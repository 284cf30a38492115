"""Load time, time to first token, prefill and decode speed, and peak memory, in the runner's child process.

Each backend is timed the way its users run it: llama.cpp through its own
context (no logits kept for prompt positions), torch with its KV cache,
ONNX through onnxruntime-genai's generator. Greedy decoding; one warm-up run,
then ``runs`` timed runs, reported as lists so the caller takes medians.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from llmops.benchmarks.runners import RunnerSpec
from llmops.core.procfs import peak_rss
from llmops.core.progress import as_reporter


class _LlamaCpp:
    def __init__(self, spec: RunnerSpec, n_ctx: int) -> None:
        from llmops.benchmarks.runner_llamacpp import LlamaCppRunner

        self.r = LlamaCppRunner(spec.path, n_ctx=n_ctx, threads=spec.threads, device=spec.device)
        self.llm = self.r.llm

    def _next(self) -> int:
        # Llama.eval keeps no logits without logits_all; read the last position's from the context
        row = np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.r.vocab_size,))
        return int(np.argmax(row))

    def run(self, prompt: list[int], n_new: int) -> tuple[float, float, int]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self._next()
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            llm.eval([tok])
            tok = self._next()
        return t1 - t0, time.perf_counter() - t1, n_new


class _Torch:
    def __init__(self, spec: RunnerSpec, n_ctx: int) -> None:
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.torch = torch
        if spec.backend == "gptq":
            from llmops.benchmarks.runner_gptq import GPTQRunner

            self.model = GPTQRunner(spec.path, n_ctx=n_ctx, threads=spec.threads, device=spec.device).model
        else:
            from llmops.benchmarks.runner_torch import load_torch_model

            self.model = load_torch_model(spec.path)
        self.device = "cuda" if spec.device == "cuda" else "cpu"
        self.model.to(self.device)

    def run(self, prompt: list[int], n_new: int) -> tuple[float, float, int]:
        torch = self.torch
        with torch.inference_mode():
            ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            tok = out.logits[0, -1].argmax().view(1, 1)
            past = out.past_key_values
            if self.device == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(n_new - 1):
                out = self.model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[0, -1].argmax().view(1, 1)
            if self.device == "cuda":
                torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1, n_new


class _GenAI:
    """onnxruntime-genai's generator (0.18 API), the way its users decode an ONNX folder.

    ``threads`` goes to the decoder's session options through a config overlay (otherwise
    genai_config.json's setting, by default all cores, applies). ``min_length`` equal to
    ``max_length`` keeps an end-of-sequence token from stopping a run early, so every
    backend decodes the same number of tokens.
    """

    def __init__(self, spec: RunnerSpec, n_ctx: int) -> None:
        import json

        import onnxruntime_genai as og

        from llmops.core.genai_config import check_folder

        # before onnxruntime-genai reads it: the file can name native libraries and paths out of the folder
        check_folder(spec.path)
        self.og = og
        config = og.Config(spec.path)
        if spec.threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(spec.threads), "inter_op_num_threads": 1}}}}))
        if spec.device == "cuda":
            config.clear_providers()
            config.append_provider("cuda")
        self.model = og.Model(config)

    def run(self, prompt: list[int], n_new: int) -> tuple[float, float, int]:
        og = self.og
        total = len(prompt) + n_new
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))  # the prompt's forward pass
        gen.generate_next_token()  # picks the first token from the prompt's logits
        t1 = time.perf_counter()
        done = 1
        while done < n_new and not gen.is_done():
            gen.generate_next_token()  # one forward pass of the previous token, then the pick
            done += 1
        return t1 - t0, time.perf_counter() - t1, done


BACKENDS = {"llama.cpp": _LlamaCpp, "torch": _Torch, "gptq": _Torch, "onnx": _GenAI}


def measure(spec: RunnerSpec, job: dict[str, Any], progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Runs in the child: load, warm up, time ``runs`` generations of ``decode_tokens`` after a prompt;
    the timed runs (the warm-up before them) are one progress phase of ``progress``."""
    prompt = [int(t) for t in np.load(job["prompt"])]
    n_new = int(job.get("decode_tokens", 128))
    runs = int(job.get("runs", 3))
    rss0 = peak_rss()
    t0 = time.perf_counter()
    runner = BACKENDS[spec.backend](spec, n_ctx=len(prompt) + n_new + 8)
    load_s = time.perf_counter() - t0
    result: dict[str, Any] = {"load_s": load_s, "rss_before_load_bytes": rss0}
    if job.get("latency", True):
        with as_reporter(progress).phase(job.get("phase") or f"latency ({spec.backend})", total=runs,
                                         unit="run") as bar:
            runner.run(prompt, min(8, n_new))  # warm-up: first-call allocations, kernel selection
            ttft, prefill, decode = [], [], []
            for _ in range(runs):
                t_first, t_rest, n = runner.run(prompt, n_new)
                ttft.append(t_first * 1000)
                prefill.append(len(prompt) / t_first)
                decode.append((n - 1) / t_rest if t_rest > 0 and n > 1 else float("nan"))
                bar.advance()
        result.update(ttft_ms=ttft, prefill_tps=prefill, decode_tps=decode, prompt_tokens=len(prompt),
                      decode_tokens=n_new, runs=runs)
    result["peak_rss_bytes"] = peak_rss()
    if spec.device == "cuda":
        try:
            import torch

            result["peak_vram_bytes"] = int(torch.cuda.max_memory_allocated())
        except Exception:  # noqa: BLE001 - not every backend goes through torch
            pass
    return result
