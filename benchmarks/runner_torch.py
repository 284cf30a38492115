"""The torch runner: a Hugging Face checkpoint in transformers, float32 on CPU (or CUDA)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from llmops.benchmarks.runners import HFTokenizerMixin, score_choices_by_logits


class TorchLogitsMixin:
    """Full-sequence logits from a transformers causal LM in ``self.model`` (torch and GPTQ runners)."""

    device: str = "cpu"
    context_length: int | None = None

    def _init_torch(self, threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch

    def logits(self, tokens: np.ndarray, first: int = 0, last: int | None = None, *, view: bool = False) -> np.ndarray:
        torch = self.torch
        n = len(tokens)
        last = n if last is None else last
        with torch.inference_mode():
            ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None].to(self.device)
            # logits_to_keep=k: the output projection runs on the last k positions only
            out = self.model(input_ids=ids, use_cache=False, logits_to_keep=n - first).logits[0]
        return out[: last - first].float().cpu().numpy()

    def score_choices(self, context: np.ndarray, continuations: list[np.ndarray]) -> list[tuple[float, bool]]:
        return self.score_choice_groups([(context, continuations)])[0]

    def score_choice_groups(self, groups: list[tuple[np.ndarray, list[np.ndarray]]]) -> list[list[tuple[float, bool]]]:
        """:meth:`score_choices` of several questions in two forward passes. First the contexts,
        right padded into one batch (causal attention keeps the padding out of every real row),
        their KV cache kept and the output projection run only at the contexts' last positions.
        Then every continuation but its last token, right padded into one batch over its own
        question's rows of that cache, with each context's padding masked out and positions
        numbered on from its real length. Log-probabilities in float32, as lm-eval's hf model
        computes them on a float32 model."""
        if len(groups) > 1 and self._sliding_window():
            # a sliding-window cache keeps the last positions of the padded batch, not of each
            # context: such a model scores its questions one by one (no padding)
            return [self.score_choice_groups([g])[0] for g in groups]
        torch = self.torch
        dev = self.device
        lens = [len(c) for c, _ in groups]
        width = max(lens)
        ids = torch.zeros((len(groups), width), dtype=torch.int64)
        mask = torch.zeros((len(groups), width), dtype=torch.int64)
        for g, (ctx, _) in enumerate(groups):
            ids[g, : lens[g]] = torch.from_numpy(np.asarray(ctx, dtype=np.int64))
            mask[g, : lens[g]] = 1
        ends = sorted({n - 1 for n in lens})
        rows = [(g, j) for g, (_, conts) in enumerate(groups) for j, c in enumerate(conts) if len(c) > 1]
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=bool(rows),
                             logits_to_keep=torch.tensor(ends, dtype=torch.int64, device=dev))
            at = {p: i for i, p in enumerate(ends)}
            first = torch.nn.functional.log_softmax(out.logits.float(), dim=-1)  # [groups, len(ends), vocab]
            rest = None
            if rows:
                # transformers 5.x renames past_key_values to cache (the old name warns until 5.40)
                new_name = "cache" in inspect.signature(self.model.forward).parameters
                cache = getattr(out, "cache" if new_name else "past_key_values", None)
                if not hasattr(cache, "batch_select_indices"):  # a cache that cannot be shared
                    return [score_choices_by_logits(self, c, conts) for c, conts in groups]
                tail = max(len(groups[g][1][j]) - 1 for g, j in rows)
                cont_ids = torch.zeros((len(rows), tail), dtype=torch.int64)
                for r, (g, j) in enumerate(rows):
                    cont_ids[r, : len(groups[g][1][j]) - 1] = torch.from_numpy(
                        np.asarray(groups[g][1][j][:-1], dtype=np.int64))
                owner = torch.tensor([g for g, _ in rows], dtype=torch.int64)
                positions = torch.tensor([lens[g] for g, _ in rows], dtype=torch.int64)[:, None] + torch.arange(tail)
                cache.batch_select_indices(owner.to(dev))
                logits = self.model(input_ids=cont_ids.to(dev), position_ids=positions.to(dev), use_cache=True,
                                    attention_mask=torch.cat([mask[owner], torch.ones((len(rows), tail),
                                                                                       dtype=torch.int64)], 1).to(dev),
                                    **{"cache" if new_name else "past_key_values": cache}).logits.float()
                rest = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            row_of = {gj: r for r, gj in enumerate(rows)}
            scores: list[list[tuple[float, bool]]] = []
            for g, (_, conts) in enumerate(groups):
                head = first[g, at[lens[g] - 1]][None]
                mine = []
                for j, cont in enumerate(conts):
                    cont_t = torch.from_numpy(np.asarray(cont, dtype=np.int64)).to(head.device)
                    lp = head if len(cont) == 1 else torch.cat([head, rest[row_of[g, j], : len(cont) - 1]], 0)
                    picked = lp.gather(1, cont_t[:, None])[:, 0]
                    mine.append((float(picked.sum()), bool((lp.argmax(dim=-1) == cont_t).all())))
                scores.append(mine)
        return scores


    def _sliding_window(self) -> bool:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        return bool(getattr(cfg, "sliding_window", None)) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())


def config_context(config: Any) -> int | None:
    """The context a transformers config says the model has: the fields lm-eval's hf model reads,
    in its order (the nested text config of a composite model first)."""
    cfg = getattr(config, "text_config", None) or config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if value is not None:
            return int(value)
    return None


class TorchRunner(TorchLogitsMixin, HFTokenizerMixin):
    """A Hugging Face checkpoint (folder, or bare weights file with config.json beside it) on CPU in float32."""

    def __init__(self, path: str, n_ctx: int = 512, threads: int | None = None, vocab_only: bool = False,
                 device: str = "cpu") -> None:
        self._init_torch(threads)
        self._load_tokenizer(path)
        if vocab_only:
            self.vocab_size = len(self.tokenizer)
            return
        self.model = load_torch_model(path)
        self.vocab_size = int(self.model.config.vocab_size)
        self.context_length = config_context(self.model.config)


def load_torch_model(path: str) -> Any:
    """The checkpoint as a float32 transformers model; refuses one with missing weights.

    transformers fills a weight the checkpoint lacks with random values and only warns:
    benchmarking that would report the figures of a random model under the checkpoint's
    name, so any missing weight (other than an output head tied to the embedding) is an error."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmops.core.errors import LLMOpsError

    p = Path(path)
    if p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))):
        model, info = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, output_loading_info=True)
        missing = list(info.get("missing_keys") or [])
    else:
        # bare weights or *.pth: build from config.json and load through the safe loader
        from llmops.core.checkpoint import open_checkpoint

        ckpt = open_checkpoint(p)
        if (ckpt.root / "config.json").is_file():
            config = AutoConfig.from_pretrained(ckpt.root)
        else:  # a layout whose config is derived (Meta's params.json): the view's config
            cfg = {k: v for k, v in ckpt.config.items() if k not in ("architectures", "torch_dtype")}
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        sd = {n: torch.from_numpy(np.array(ckpt.float32(n))) for n in ckpt.names()}
        missing = list(model.load_state_dict(sd, strict=False).missing_keys)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise LLMOpsError(f"{path}: the checkpoint lacks {len(missing)} weight(s) the model needs ({shown}); "
                          "refusing to benchmark randomly initialised weights")
    return model.eval()
