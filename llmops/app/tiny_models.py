"""Tiny random-weight models for fast tests and examples.

Each is a real transformers architecture with a real byte-level BPE tokenizer,
saved as safetensors in the Hugging Face layout, so every converter and runner
exercises the same code paths as on a full-size checkpoint, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Small but not degenerate: several heads, grouped-query attention where the
# family has it, and hidden sizes that quantize with block size 32 and 256.
_COMMON: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "rope_theta": 10000.0},
    "mixtral": {"model_type": "mixtral", "rope_theta": 1000000.0, "num_local_experts": 4, "num_experts_per_tok": 2,
                "intermediate_size": 256, "sliding_window": None},
    "qwen2_moe": {"model_type": "qwen2_moe", "rope_theta": 1000000.0, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256, "decoder_sparse_step": 1},
    "qwen3_moe": {"model_type": "qwen3_moe", "rope_theta": 1000000.0, "head_dim": 64, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 128, "decoder_sparse_step": 1,
                  "norm_topk_prob": True},  # as Qwen3-MoE releases ship it (llama.cpp always normalizes)
    "qwen2": {"model_type": "qwen2", "rope_theta": 1000000.0, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "rope_theta": 1000000.0, "head_dim": 64, "tie_word_embeddings": True},
    "gemma2": {
        "model_type": "gemma2",
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
        "sliding_window": 256,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
        "tie_word_embeddings": True,
    },
    "phi3": {"model_type": "phi3", "num_key_value_heads": 4, "rope_theta": 10000.0},
    # Llama 3.1/3.2: frequency-dependent RoPE scaling; an original context of 64 puts the 32
    # frequencies of a 64-wide head in all three bands (kept, smoothed, divided by the factor)
    "llama3": {"model_type": "llama", "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}},
    "llama_tied": {"model_type": "llama", "rope_theta": 10000.0, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "rope_theta": 1000000.0, "sliding_window": None},
    # a window shorter than the test prompts, so that the mask is exercised
    "mistral_swa": {"model_type": "mistral", "rope_theta": 10000.0, "sliding_window": 8},
    "olmo2": {"model_type": "olmo2", "rope_theta": 500000.0},
    # Granite 3's multipliers, scaled to the tiny widths: none of them is the neutral 1.0
    "granite": {"model_type": "granite", "rope_theta": 10000.0, "embedding_multiplier": 12.0,
                "residual_multiplier": 0.22, "attention_multiplier": 0.0625, "logits_scaling": 4.0},
    # SmolLM3 leaves RoPE out of every 4th layer (layer 3 here); llama.cpp has that step built in
    "smollm3": {"model_type": "smollm3", "rope_theta": 2000000.0, "num_hidden_layers": 4,
                "no_rope_layer_interval": 4, "tie_word_embeddings": True},
    # Phi-4-mini: 3/4 of each head rotated, LongRoPE short/long factors (24 = 0.75 * 64 / 2 each),
    # tied embeddings. llama.cpp takes the long factors when its context exceeds the original one.
    "phi4_mini": {"model_type": "phi3", "partial_rotary_factor": 0.75, "tie_word_embeddings": True,
                  "max_position_embeddings": 4096, "original_max_position_embeddings": 512,
                  "rope_scaling": {"rope_type": "longrope", "rope_theta": 10000.0,
                                   "short_factor": [1.0 + 0.05 * i for i in range(24)],
                                   "long_factor": [1.0 + 0.75 * i for i in range(24)]}},
    "gemma3": {"model_type": "gemma3_text", "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 256,
               "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 256, "n_layer": 2, "n_head": 4, "n_positions": 512},
}

# Phi-4-mini ships a GPT-2 tokenizer and says so; llama.cpp's converter reads tokenizer.json only
# for that class (other Phi-3 checkpoints are SentencePiece).
TOKENIZER_CLASSES: dict[str, str] = {"phi4_mini": "GPT2Tokenizer"}

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Models are converted, benchmarked and registered. "
    "Perplexity measures how well a language model predicts text; lower is better. 0123456789 "
    "= Robert Boulter = Robert Boulter is an English film , television and theatre actor . "
)


def build_tokenizer(dest: Path, tokenizer_class: str | None = None) -> None:
    """A byte-level BPE like GPT-2's/SmolLM2's, trained on a few sentences; ``tokenizer_class``
    names the class in tokenizer_config.json where a family's checkpoints name one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    # Say what the tokenizer does (no BOS, no EOS added) in its config, as released tokenizers do:
    # llama.cpp's converter writes those flags only when the config has them.
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(add_bos_token=False, add_eos_token=False)
    if tokenizer_class:
        cfg["tokenizer_class"] = tokenizer_class
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def tiny_model(arch: str, dest: str | Path, seed: int = 0, dtype: str = "float32",
               overrides: dict[str, Any] | None = None) -> Path:
    """Write a random-initialised ``arch`` model (safetensors + tokenizer) to ``dest``.

    ``overrides`` replace config fields (a wider or deeper model for tests that need size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    build_tokenizer(dest, TOKENIZER_CLASSES.get(arch))
    vocab = len(AutoTokenizer.from_pretrained(dest))
    params = {**_COMMON, **ARCHITECTURES[arch]}
    model_type = params.pop("model_type")
    if model_type == "gpt2":
        params = {k: v for k, v in params.items() if k not in _COMMON}
    params.update(overrides or {})
    params["vocab_size"] = vocab
    params.update(bos_token_id=0, eos_token_id=2, pad_token_id=0)
    config = AutoConfig.for_model(model_type, **params)
    config.dtype = dtype
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init with std 0.02 gives near-uniform logits; a wider spread makes
    # logit comparisons between runtimes meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(dest, safe_serialization=True)
    (dest / "llmops_fixture.json").write_text(json.dumps({"arch": arch, "seed": seed, "random": True}))
    return dest
