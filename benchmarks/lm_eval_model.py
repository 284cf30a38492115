"""One lm-eval model class over llmops' runners, so every backend is scored by the harness itself.

:class:`RunnerLM` subclasses lm-eval's ``TemplateLM``: lm-eval's own ``loglikelihood`` turns
each (context, continuation) request into tokens (its empty-context rule and its
``_encode_pair`` split, trailing spaces moved into the continuation), and its evaluator
builds the prompts, applies the task's filters and computes ``acc``/``acc_norm``. This class
only answers the token requests, through the artifact's own runner (torch, llama.cpp,
onnxruntime, GPTQ), with lm-eval's hf model's truncation rule: a request longer than the
context keeps its last ``max_length + 1`` tokens and drops the final one.

The runner lives in a child process (``jobs.py``): in the evaluator's process a
``RunnerLM`` holds no model and sends all the requests of an evaluation, every task's, to
one child job, which builds its own ``RunnerLM`` around the runner and runs lm-eval's
``loglikelihood`` there, where the tokenizer is; the answers come back as one array. The
requests of a multiple-choice question share their context tokens: they are scored as one
group, so a runner with a KV cache evaluates the context once (and the torch runner scores
several questions' groups in one batch).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from llmops.benchmarks.runners import LogitsRunner, RunnerSpec, make_runner
from llmops.core.errors import LLMOpsError
from llmops.core.progress import Reporter, as_reporter
from llmops.core.settings import scratch

Request = tuple[tuple[str, str], list[int], list[int]]


class RunnerLM(TemplateLM):
    """lm-eval's view of an llmops artifact. With ``runner`` it scores in this process (the child
    side); without, each ``loglikelihood`` call is one child job running ``spec``'s runner."""

    def __init__(self, spec: RunnerSpec, *, runner: LogitsRunner | None = None, max_length: int = 2048,
                 progress: Callable[[str], None] | Reporter | None = None, phase: str = "tasks") -> None:
        super().__init__()
        self.spec = spec
        self.runner = runner
        limit = getattr(runner, "context_length", None) if runner is not None else None
        # lm-eval's hf model truncates at the model's own context; ours is never longer than the runner's
        self._max_length = min(max_length, limit) if limit else max_length
        self.progress = progress
        self.phase = phase
        self._bos_text: str | None = None
        self.used_max_length: int | None = None  # the context the child's runner truncated at

    # -- what lm-eval asks of a model ------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self._local().eos_id

    @property
    def prefix_token_id(self) -> int:
        r = self._local()
        return r.bos_id if r.bos_id >= 0 else r.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As lm-eval's hf model: the tokenizer's default special tokens unless told, and none for a
        string that already starts with the prefix token's text."""
        r = self._local()
        if add_special_tokens is None:
            if self._bos_text is None:
                self._bos_text = r.token_text(self.prefix_token_id) if self.prefix_token_id >= 0 else ""
            add_special_tokens = not (self._bos_text and string.startswith(self._bos_text))
        return r.tokenize(string, add_special=add_special_tokens).tolist()

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.runner is None:
            return self._in_child(requests)
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        raise LLMOpsError("llmops scores multiple-choice and loglikelihood tasks; this task asks for "
                          "rolling loglikelihoods (perplexity tasks: use --metrics accuracy)")

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        raise LLMOpsError("llmops scores multiple-choice and loglikelihood tasks; this task asks for generated text")

    def _local(self) -> LogitsRunner:
        if self.runner is None:
            raise RuntimeError("tokenization happens where the runner is (the child job)")
        return self.runner

    # -- the child side ----------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Requests grouped by their context tokens, each group scored by the runner in one call."""
        runner = self._local()
        limit = self.max_length
        groups: dict[tuple[int, ...] | int, list[int]] = {}
        contexts: dict[tuple[int, ...] | int, np.ndarray] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise LLMOpsError("a request with an empty context or continuation reached the model")
            if len(cont) > limit:
                raise LLMOpsError(f"a continuation of {len(cont)} tokens is longer than the context of {limit}")
            if len(ctx) + len(cont) <= limit + 1:
                key: tuple[int, ...] | int = tuple(ctx)
                contexts.setdefault(key, np.asarray(ctx, dtype=np.int32))
            else:  # lm-eval's hf rule: the last max_length + 1 tokens, the final one not fed
                key = i
                contexts[key] = np.asarray((ctx + cont)[-(limit + 1):][: -len(cont)], dtype=np.int32)
            groups.setdefault(key, []).append(i)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batched = getattr(runner, "score_choice_groups", None)
        keys = list(groups)
        if batched is not None:  # similar lengths side by side: less padding in each batch
            keys.sort(key=lambda k: len(contexts[k]))
        with as_reporter(self.progress).phase(self.phase, total=len(groups), unit="question") as bar:
            for chunk in _batches(keys, contexts, groups, requests) if batched is not None else ([k] for k in keys):
                items = [(contexts[k], [np.asarray(requests[i][2], dtype=np.int32) for i in groups[k]]) for k in chunk]
                answers = batched(items) if batched is not None else [runner.score_choices(*items[0])]
                for key, scores in zip(chunk, answers):
                    for i, score in zip(groups[key], scores):
                        out[i] = (float(score[0]), bool(score[1]))
                bar.advance(len(chunk))
        return out

    # -- the evaluator's side --------------------------------------------------------------
    def _in_child(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from llmops.benchmarks.jobs import run_in_child

        if not requests:
            return []
        with scratch("llmops-tasks-") as d:
            req_file, out_file = d / "requests.json", d / "scores.npy"
            req_file.write_text(json.dumps([list(r.args[:2]) for r in requests]), encoding="utf-8")
            reply = run_in_child({"kind": "loglikelihood", "spec": self.spec.__dict__, "requests": str(req_file),
                                  "out": str(out_file), "max_length": self._max_length, "phase": self.phase},
                                 f"{self.spec.backend} runner", d, progress=self.progress)
            self.used_max_length = int(reply["max_length"])
            scores = np.load(out_file)
        if scores.shape != (len(requests), 2):
            raise LLMOpsError(f"the {self.spec.backend} runner answered {scores.shape[0]} of {len(requests)} requests")
        return [(float(lp), bool(g)) for lp, g in scores]


# A batch of questions for a runner that scores several at once: at most this many context
# tokens (padded), continuation tokens (padded) and questions.
BATCH_CONTEXT_TOKENS = 2048
BATCH_CONTINUATION_TOKENS = 1024
BATCH_QUESTIONS = 16


def _batches(keys: list[Any], contexts: dict[Any, np.ndarray], groups: dict[Any, list[int]],
             requests: list[Request]) -> Any:  # noqa: ANN401 - an iterator of lists of keys
    chunk: list[Any] = []
    width = tail = rows = 0
    for key in keys:
        w = max(width, len(contexts[key]))
        t = max([tail] + [len(requests[i][2]) - 1 for i in groups[key]])
        r = rows + len(groups[key])
        if chunk and (w * (len(chunk) + 1) > BATCH_CONTEXT_TOKENS or t * r > BATCH_CONTINUATION_TOKENS
                      or len(chunk) >= BATCH_QUESTIONS):
            yield chunk
            chunk, w, t, r = [], len(contexts[key]), max(len(requests[i][2]) - 1 for i in groups[key]), len(groups[key])
        chunk.append(key)
        width, tail, rows = w, t, r
    if chunk:
        yield chunk


def loglikelihood_job(job: dict[str, Any], say: Callable[[str], None] | Reporter) -> dict[str, Any]:
    """The child side of :meth:`RunnerLM._in_child`: the requests through lm-eval's
    ``loglikelihood`` on this process's runner; ``[n, 2]`` (log-probability, greedy) saved."""
    spec = RunnerSpec(**job["spec"])
    runner = make_runner(_fit_context(spec))
    lm = RunnerLM(spec, runner=runner, max_length=int(job["max_length"]), progress=say,
                  phase=job.get("phase") or "tasks")
    pairs = json.loads(Path(job["requests"]).read_text(encoding="utf-8"))
    instances = [Instance("loglikelihood", {}, (str(c), str(x)), i) for i, (c, x) in enumerate(pairs)]
    scores = lm.loglikelihood(instances)
    np.save(job["out"], np.asarray(scores, dtype=np.float64).reshape(len(instances), 2))
    return {"requests": len(instances), "max_length": lm.max_length}


def _fit_context(spec: RunnerSpec) -> RunnerSpec:
    """An ONNX folder refuses a context longer than its own: ask for at most that."""
    if spec.backend != "onnx":
        return spec
    from llmops.core.genai_config import check_folder

    folder = Path(spec.path)
    folder = folder.parent if folder.is_file() else folder
    context = (check_folder(folder, required=False).get("model") or {}).get("context_length")
    return replace(spec, n_ctx=min(spec.n_ctx, int(context))) if context else spec
