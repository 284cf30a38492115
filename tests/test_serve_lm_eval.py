"""`llmops serve` as lm-eval's `local-completions` backend: the real harness against a real
server of a tiny GGUF gives the loglikelihoods llama-cpp-python computes in this process from
the same file's logits, token by token, and the accuracy that follows from them, question by question
what `llmops bench --metrics tasks` gives the same file; and the echo
`logprobs` the harness reads are aligned with the logits position by position, with and
without a BOS token, for GGUF and ONNX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_serve import KEY, Server, _env, artifacts, onnx_model, raw, start_server  # noqa: F401 - fixtures

TASK = "llmops_tiny_qa"
QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "Berlin"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["three", "four", "five"], "answer": 1},
    {"question": "The colour of a clear sky is", "choices": ["green", "red", "blue"], "answer": 2},
    {"question": "A cat says", "choices": ["meow", "woof"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin"], "answer": 0},
]


@pytest.fixture(scope="module")
def gguf_server(artifacts, tmp_path_factory):  # noqa: ANN001, ANN201, F811
    """The GGUF file served as a path (its name is the file's: tiny-gguf-f32), with a key."""
    tmp = tmp_path_factory.mktemp("serve-lm-eval")
    env = _env(tmp / "store")
    server = start_server({**env, "LLMOPS_API_KEY": KEY}, artifacts["gguf-f32"], "--threads", "1", "--ctx", "512",
                          "--no-trace", key=KEY, tmp=tmp)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama(artifacts):  # noqa: ANN001, ANN201, F811
    """The same GGUF in llama-cpp-python, every position's logits kept (flash attention on, as the
    server runs it)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(artifacts["gguf-f32"]), n_ctx=512, n_batch=512, logits_all=True,
                          n_threads=1, n_threads_batch=1, flash_attn=True, verbose=False)
    yield llm
    llm.close()


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    m = row.max()
    return row - (m + np.log(np.exp(row - m).sum()))


def _by_logits(llm: Any, tokens: list[int]) -> list[np.ndarray]:
    """The log-softmax of the logits at every position of ``tokens``, in one evaluation."""
    llm.reset()
    llm.eval(tokens)
    return [_log_softmax(np.asarray(llm.scores[i])) for i in range(len(tokens))]


def _tokenize(llm: Any, text: str) -> list[int]:
    # what the server's /tokenize does with add_special_tokens false (special-token text is the token)
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def _encode_pair(llm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair for a causal model: trailing spaces of the
    context go with the continuation; the whole is tokenized and cut at the context's length."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole, ctx = _tokenize(llm, context + continuation), _tokenize(llm, context)
    return ctx, whole[len(ctx):]


@pytest.mark.slow
@pytest.mark.fidelity  # scores identical to llama.cpp's own: run by `make test` after the default suite
def test_lm_eval_local_completions_scores_as_llama_cpp_in_process(gguf_server: Server, llama: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   artifacts) -> None:  # noqa: ANN001, F811
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the completions requests' bearer key
    # tokenizer_backend is left to lm-eval: it finds /tokenizer_info and /tokenize and uses them
    # (its fallback, a Hugging Face tokenizer named "tiny-gguf-f32", does not exist offline)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{gguf_server.url}/v1/completions", "model": "tiny-gguf-f32", "auth_token": KEY,
                    "max_retries": 1},
        tasks=[TASK], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True, num_fewshot=0)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    correct = []
    for s in samples:
        scores = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ctx, cont = _encode_pair(llama, context, continuation)
            rows = _by_logits(llama, ctx + cont)
            expected = sum(float(rows[len(ctx) + k - 1][t]) for k, t in enumerate(cont))
            greedy = all(int(np.argmax(rows[len(ctx) + k - 1])) == t for k, t in enumerate(cont))
            got, got_greedy = resp[0]
            assert got == pytest.approx(expected, abs=2e-3), (context, continuation)
            assert got_greedy == greedy
            scores.append(expected)
        correct.append(float(int(np.argmax(scores)) == s["doc"]["answer"]))
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(correct) / len(correct))

    # the same questions through `llmops bench --metrics tasks`'s own scorer on the same file: the
    # same loglikelihood for every choice (to llama.cpp's batch-to-batch tolerance) and the same answers
    from llmops.benchmarks.runners import RunnerSpec
    from llmops.benchmarks.tasks import TaskOptions, TaskSuite

    ours = TaskSuite(TaskOptions(tasks=(TASK,), task_paths=(str(tmp_path),), num_fewshot=0)).evaluate(
        RunnerSpec("llama.cpp", str(artifacts["gguf-f32"]), 512, 1))[TASK]
    for s in samples:
        q = ours.questions[str(s["doc_id"])]
        assert q["lls"] == pytest.approx([float(r[0][0]) for r in s["resps"]], abs=2e-3)
        assert q["values"]["acc"] == s["acc"]
    assert ours.metrics["acc"] == pytest.approx(results["results"][TASK]["acc,none"])


def _echo(server: Server, tokens: list[int], **extra: Any) -> dict[str, Any]:
    code, _, data = raw(server, "/v1/completions", json.dumps({"prompt": tokens, "max_tokens": 0, "echo": True,
                                                              "logprobs": 2, "temperature": 0, **extra}).encode())
    assert code == 200, data
    return data["choices"][0]


@pytest.mark.parametrize("bos", [True, False], ids=["with-bos", "without-bos"])
def test_echo_logprobs_are_the_logits_of_each_position(gguf_server: Server, llama: Any, bos: bool) -> None:
    """Token i's log probability is what the logits at position i - 1 give it (the first token
    has none), with or without a BOS token in front: no shift by one."""
    tokens = _tokenize(llama, "The quick brown fox jumps over the lazy dog")
    if bos:
        tokens = [llama.token_bos(), *tokens]
    rows = _by_logits(llama, tokens)
    choice = _echo(gguf_server, tokens)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(tokens)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(tokens)):
        assert lp["token_logprobs"][i] == pytest.approx(float(rows[i - 1][tokens[i]]), abs=1e-4), i
        top = lp["top_logprobs"][i]
        assert len(top) == 2 and max(top.values()) == pytest.approx(float(rows[i - 1].max()), abs=1e-4)
    pieces = [llama.detokenize([t], special=True).decode("utf-8", "ignore") for t in tokens]
    assert lp["tokens"] == pieces and choice["text"] == "".join(pieces)
    assert lp["text_offset"] == [len("".join(pieces[:i])) for i in range(len(pieces))]
    assert choice["finish_reason"] == "length"
    # one generated token after the echo: its logprob is the last position's, as lm-eval's requests end
    one = _echo(gguf_server, tokens, max_tokens=1)["logprobs"]
    assert one["token_logprobs"][:-1] == lp["token_logprobs"] and len(one["tokens"]) == len(tokens) + 1
    nxt = int(np.argmax(rows[-1]))
    assert one["token_logprobs"][-1] == pytest.approx(float(rows[-1][nxt]), abs=1e-4)


def test_onnx_echo_logprobs_are_the_logits_of_each_position(onnx_model, tmp_path: Path) -> None:  # noqa: F811
    from llmops.benchmarks.runner_onnx import OnnxRunner

    runner = OnnxRunner(str(onnx_model), threads=1)
    tokens = [int(t) for t in runner.tokenize("The quick brown fox jumps over the lazy dog")]
    rows = [_log_softmax(r) for r in runner.logits(np.asarray(tokens, dtype=np.int64))]
    server = start_server(_env(tmp_path / "store"), onnx_model, "--threads", "1", "--no-trace", tmp=tmp_path)
    try:
        code, _, info = raw(server, "/tokenizer_info")
        assert code == 200 and "eos_token" in info
        code, _, tok = raw(server, "/tokenize", json.dumps({"prompt": "The quick brown fox", "add_special_tokens": False}).encode())
        assert code == 200 and tok["tokens"] == tokens[:len(tok["tokens"])]
        lp = _echo(server, tokens)["logprobs"]
    finally:
        server.stop()
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(tokens)
    for i in range(1, len(tokens)):
        assert lp["token_logprobs"][i] == pytest.approx(float(rows[i - 1][tokens[i]]), abs=2e-3), i


def test_tokenizer_endpoints_agree_with_the_model(gguf_server: Server, llama: Any) -> None:
    text = "Hello <|im_end|> world"
    code, _, data = raw(gguf_server, "/tokenize", json.dumps({"prompt": text, "add_special_tokens": False}).encode())
    assert code == 200 and data["tokens"] == _tokenize(llama, text) and data["count"] == len(data["tokens"])
    code, _, back = raw(gguf_server, "/detokenize", json.dumps({"tokens": data["tokens"]}).encode())
    assert code == 200 and back["prompt"] == text
    code, _, info = raw(gguf_server, "/tokenizer_info")
    assert code == 200 and info["eos_token"] == "<|im_end|>" and info["model_max_length"] == 512
    for body, needle in (({"tokens": [1, 10**9]}, "vocabulary"), ({"tokens": "12"}, "list of token ids")):
        code, _, err = raw(gguf_server, "/detokenize", json.dumps(body).encode())
        assert code == 400 and needle in err["error"]["message"]
