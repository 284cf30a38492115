"""Conversion benchmark: our GGUF converter against llama.cpp's own tools.

    python bench/bench_convert.py [--runs 3] [--skip-3b] [--workdir DIR]

Measures wall time and peak RSS (each run in a fresh process; the peak of its whole process tree, ``measure``) of

* F16 and Q8_0: ``llmops convert --no-verify`` (the whole command) vs llama.cpp's ``convert_hf_to_gguf.py``;
* gguf-q4 (Q4_K_M) end to end: ``llmops`` convert vs ``convert_hf_to_gguf.py --outtype f16``
  followed by llama.cpp's quantizer (``llama_model_quantize``);
* peak RSS of our F16 conversion of a synthetic ~3B-parameter bf16 safetensors checkpoint
  written to a temporary folder (streaming, so it must stay far below the model size).

on the SmolLM2-135M fixture, and prints a markdown table of medians with ratios against
the reference run in the same invocation. llama.cpp's converter is taken from the
llama-cpp-python source distribution (fetched with pip into the llmops cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmops.app.reference import reference_converter_script
from measure import measured

FTYPE_Q4_K_M = 15




def run_measured(cmds: list[list[str]], cwd: Path, steps: list[float] | None = None) -> tuple[float, int]:
    """Run commands one after another; (total wall seconds, max peak RSS bytes of any of them).
    ``steps``: gets each command's seconds appended."""
    total, peak = 0.0, 0
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    for cmd in cmds:
        secs, rss = measured(cmd, cwd, env)
        total += secs
        peak = max(peak, rss)
        if steps is not None:
            steps.append(secs)
    return total, peak


def ours(src: Path, target: str, out: Path) -> list[list[str]]:
    """The command a user types: the whole process, interpreter start and imports included."""
    return [[str(Path(sys.executable).with_name("llmops")), "convert", str(src), "--to", target, "-o", str(out),
             "--no-verify"]]


def reference(script: Path, src: Path, out_f16: Path, quantize_to: Path | None = None,
              outtype: str = "f16") -> list[list[str]]:
    cmds = [[sys.executable, str(script), str(src), "--outtype", outtype, "--outfile", str(out_f16)]]
    if quantize_to is not None:
        code = ("import sys; from llmops.converters.gguf.quantize import llama_model_quantize; "
                f"llama_model_quantize(sys.argv[1], sys.argv[2], {FTYPE_Q4_K_M})")
        cmds.append([sys.executable, "-c", code, str(out_f16), str(quantize_to)])
    return cmds


def paired(runs: int, ref: tuple[list[list[str]], Path], our: tuple[list[list[str]], Path],
           last_steps: list[float] | None = None, outputs: tuple[Path, ...] = ()) -> tuple[float, int, float, int]:
    """Medians (reference seconds, RSS, ours seconds, RSS) of runs taken in turn: this machine's
    speed drifts within minutes, and a block of one side's runs then another's would measure it.
    ``last_steps``: gets the seconds of the reference's last command in each run. ``outputs``: the
    files both sides write, removed (untimed) before each run: replacing the previous run's
    270 MB file makes the kernel free it inside the timed command (~40 ms, in our rename or in
    the reference's truncating open), work a conversion to a new path never does."""
    refs, ours_ = [], []

    def clear() -> None:
        for f in outputs:
            f.unlink(missing_ok=True)

    for _ in range(runs):
        steps: list[float] = []
        clear()
        refs.append(run_measured(*ref, steps=steps))
        if last_steps is not None:
            last_steps.append(steps[-1])
        clear()
        ours_.append(run_measured(*our))
    med = statistics.median
    return (med(r[0] for r in refs), int(med(r[1] for r in refs)), med(r[0] for r in ours_),
            int(med(r[1] for r in ours_)))


def write_synthetic(dest: Path, tokenizer_from: Path, *, layers: int = 30, hidden: int = 3072,
                    intermediate: int = 8192, heads: int = 24, kv_heads: int = 8, vocab: int = 49152,
                    experts: int = 0, tied: bool = True, shard_gb: float = 0) -> int:
    """A Llama-shaped bf16 safetensors checkpoint (~3.2B parameters with the defaults), written streaming;
    with ``experts``, Mixtral-shaped (that many SwiGLU experts of width ``intermediate`` per layer);
    with ``shard_gb``, in shards of about that size with a ``model.safetensors.index.json``, as
    Hugging Face saves large models."""
    import numpy as np

    dest.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_from / f).is_file():
            (dest / f).write_bytes((tokenizer_from / f).read_bytes())
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
        })
        if experts:
            shapes[p + "block_sparse_moe.gate.weight"] = (experts, hidden)
            for e in range(experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                shapes.update({x + "w1.weight": (intermediate, hidden), x + "w2.weight": (hidden, intermediate),
                               x + "w3.weight": (intermediate, hidden)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (intermediate, hidden),
                           p + "mlp.up_proj.weight": (intermediate, hidden),
                           p + "mlp.down_proj.weight": (hidden, intermediate)})
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if shard_gb and groups[-1] and size + n > shard_gb * 1e9:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    rng = np.random.default_rng(0)
    block = (rng.normal(0, 0.02, size=8 << 20).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    weight_map: dict[str, str] = {}
    for k, names in enumerate(groups):
        fname = (f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 or shard_gb
                 else "model.safetensors")
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for name in names:
            n = int(np.prod(shapes[name])) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dest / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            left = off
            while left:
                chunk = block[: min(len(block), left)]
                f.write(chunk)
                left -= len(chunk)
    if shard_gb:
        total = sum(int(np.prod(s)) * 2 for s in shapes.values())
        (dest / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["MixtralForCausalLM" if experts else "LlamaForCausalLM"],
        "model_type": "mixtral" if experts else "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
        **({"num_local_experts": experts, "num_experts_per_tok": 2} if experts else {}),
    }
    (dest / "config.json").write_text(json.dumps(config))
    return sum(int(np.prod(s)) for s in shapes.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-3b", action="store_true")
    ap.add_argument("--skip-moe", action="store_true", help="skip the synthetic 3B mixture-of-experts case")
    ap.add_argument("--only-moe", action="store_true", help="run the mixture-of-experts case alone")
    ap.add_argument("--llama7b", type=int, metavar="LAYERS", default=0,
                    help="run only the Llama-7B-shaped case with this many layers (32: the whole 6.7B)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from llmops.app.fixtures import smollm2_checkpoint

    src = smollm2_checkpoint()
    script = reference_converter_script()
    with tempfile.TemporaryDirectory(prefix="llmops-bench-", dir=args.workdir) as d:
        wd = Path(d)
        if args.only_moe:
            synthetic_moe(wd, src)
            return
        if args.llama7b:
            synthetic_llama7b(wd, src, script, args.llama7b)
            return
        rows = []
        made = (wd / "ref-f16.gguf", wd / "our-f16.gguf")
        t_ref, m_ref, t_our, m_our = paired(args.runs, (reference(script, src, made[0]), script.parent),
                                            (ours(src, "gguf-f16", made[1]), wd), outputs=made)
        rows.append(("F16", t_our, m_our, "convert_hf_to_gguf.py --outtype f16", t_ref, m_ref))
        made = (wd / "ref-q8.gguf", wd / "our-q8.gguf")
        t_ref, m_ref, t_our, m_our = paired(
            args.runs, (reference(script, src, made[0], outtype="q8_0"), script.parent),
            (ours(src, "gguf-q8_0", made[1]), wd), outputs=made)
        rows.append(("Q8_0", t_our, m_our, "convert_hf_to_gguf.py --outtype q8_0", t_ref, m_ref))
        quantize_steps: list[float] = []
        made = (wd / "ref-f16b.gguf", wd / "ref-q4.gguf", wd / "our-q4.gguf")
        t_ref, m_ref, t_our, m_our = paired(
            args.runs, (reference(script, src, made[0], made[1]), script.parent),
            (ours(src, "gguf-q4", made[2]), wd), quantize_steps, outputs=made)
        rows.append(("gguf-q4 (Q4_K_M)", t_our, m_our, "convert f16 + llama_model_quantize", t_ref, m_ref))
        t_q4, t_quant = t_our, statistics.median(quantize_steps)

        print(f"SmolLM2-135M fp32 ({src}), medians of {args.runs} runs taken in turn with the reference's, "
              f"{os.cpu_count()} CPU(s)\n")
        print("| target | llmops time | llmops peak RSS | reference | ref time | ref peak RSS | time ratio | RSS ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for name, t, m, ref, tr, mr in rows:
            print(f"| {name} | {t:.2f} s | {m / 1e6:.0f} MB | {ref} | {tr:.2f} s | {mr / 1e6:.0f} MB "
                  f"| {t / tr:.2f}x | {m / mr:.2f}x |")
        # the K-quant arithmetic is llama.cpp's own in both: its quantize step alone bounds the ratio
        print(f"\ngguf-q4: llama_model_quantize alone {t_quant:.2f} s (median), {t_quant / t_ref:.2f}x of both "
              f"steps; llmops {t_q4 / t_quant:.2f}x that step")
        sys.stdout.flush()

        if not args.skip_3b:
            big = wd / "synthetic-3b"
            t0 = time.perf_counter()
            n = write_synthetic(big, src)
            size = (big / "model.safetensors").stat().st_size
            print(f"\nsynthetic checkpoint: {n / 1e9:.2f}B parameters, bf16, {size / 1e9:.1f} GB "
                  f"(written in {time.perf_counter() - t0:.0f} s)\n")
            t, m = run_measured(ours(big, "gguf-f16", wd / "big-f16.gguf"), wd)
            (wd / "big-f16.gguf").unlink(missing_ok=True)
            print("| checkpoint | target | llmops time | llmops peak RSS | target |")
            print("|---|---|---|---|---|")
            print(f"| synthetic {n / 1e9:.2f}B bf16 | F16 | {t:.1f} s | {m / 1e6:.0f} MB | < 1000 MB |")
            shutil.rmtree(big, ignore_errors=True)
        if not args.skip_moe:
            synthetic_moe(wd, src)


def synthetic_llama7b(wd: Path, src: Path, script: Path, layers: int) -> None:
    """``gguf-q4`` of a Llama-2-7B-shaped bf16 checkpoint (4096 wide, 11008 MLP, 32 heads, untied head,
    5 GB shards; ``layers`` of its 32; SmolLM2's 49152-token vocabulary, so that its tokenizer serves)
    against llama.cpp's two steps on the same files, each step timed on its own: at this size the K-quant arithmetic dominates both, so the floor is
    llama.cpp's quantize step alone. Then ``llmops models register`` of our output against ``cp`` +
    ``sync`` of the same file. One run each (minutes per run); the disk must hold the checkpoint, the
    reference F16 and both outputs."""
    big = wd / "synthetic-llama7b"
    need = layers / 32 * (13.5 + 13.5 + 2 * 4.1) + 0.6
    free = shutil.disk_usage(wd).free / 1e9
    if free < need:
        raise SystemExit(f"{wd}: {free:.0f} GB free, the {layers}-layer case needs about {need:.0f} GB")
    t0 = time.perf_counter()
    n = write_synthetic(big, src, layers=layers, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                        vocab=49152, tied=False, shard_gb=5)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    print(f"\nsynthetic Llama-7B-shaped checkpoint, {layers} layers: {n / 1e9:.2f}B parameters, bf16, "
          f"{size / 1e9:.1f} GB in {len(list(big.glob('*.safetensors')))} shards "
          f"(written in {time.perf_counter() - t0:.0f} s), {os.cpu_count()} CPU(s)\n")
    sys.stdout.flush()
    ours_q4, ref_f16, ref_q4 = wd / "ours-q4.gguf", wd / "ref-f16.gguf", wd / "ref-q4.gguf"
    t_our, m_our = run_measured(ours(big, "gguf-q4", ours_q4), wd)
    convert_step, quantize_step = reference(script, big, ref_f16, ref_q4)
    t_conv, m_conv = run_measured([convert_step], script.parent)
    t_quant, m_quant = run_measured([quantize_step], wd)
    diffs = tensor_differences(ours_q4, ref_q4)
    print("| | time | peak RSS | time ratio (llmops / this) |")
    print("|---|---|---|---|")
    print(f"| llmops convert --to gguf-q4 | {t_our:.1f} s | {m_our / 1e6:.0f} MB | |")
    print(f"| convert_hf_to_gguf.py --outtype f16 | {t_conv:.1f} s | {m_conv / 1e6:.0f} MB | |")
    print(f"| llama_model_quantize Q4_K_M | {t_quant:.1f} s | {m_quant / 1e6:.0f} MB | {t_our / t_quant:.2f}x |")
    print(f"| both llama.cpp steps | {t_conv + t_quant:.1f} s | {max(m_conv, m_quant) / 1e6:.0f} MB "
          f"| {t_our / (t_conv + t_quant):.2f}x |")
    print(f"\ntensors identical to llama.cpp's (names, order, types, data): {not diffs}"
          + "".join(f"\n  {d}" for d in diffs[:10]) + (f"\n  ... {len(diffs)} in all" if len(diffs) > 10 else ""))
    sys.stdout.flush()
    for f in (ref_f16, ref_q4):
        f.unlink(missing_ok=True)
    shutil.rmtree(big, ignore_errors=True)
    from bench_register import prepare_store, time_cp, time_register

    store = wd / "store"
    prepare_store(store)
    # the reference's steps have pushed our output out of the page cache since it was written, and
    # whichever side reads it first would pay the disk read for both: read it once for both
    with open(ours_q4, "rb") as f:
        while f.read(64 << 20):
            pass
    t_reg = time_register(ours_q4, store)
    t_cp = time_cp(ours_q4, wd / "copy.gguf")
    print(f"\nllmops models register of the {ours_q4.stat().st_size / 1e9:.2f} GB output: {t_reg:.1f} s; "
          f"cp + sync: {t_cp:.1f} s ({t_reg / t_cp:.2f}x)")


def _tensors(path: Path) -> dict[str, tuple[str, str]]:
    """Each tensor's (type, sha256 of its data), in file order (the key-value headers differ: the
    reference's names the model from its folder)."""
    import hashlib

    import gguf

    return {t.name: (t.tensor_type.name, hashlib.sha256(t.data.tobytes()).hexdigest())
            for t in gguf.GGUFReader(path).tensors}


def tensor_differences(ours_path: Path, ref_path: Path) -> list[str]:
    """What differs between two GGUFs' tensors: names, order, types or data (empty: identical)."""
    a, b = _tensors(ours_path), _tensors(ref_path)
    if set(a) != set(b):
        return [f"only in ours: {sorted(set(a) - set(b))[:5]}; only in llama.cpp's: {sorted(set(b) - set(a))[:5]}"]
    diffs = [f"{n}: {a[n][0]} vs {b[n][0]}" + ("" if a[n][0] != b[n][0] else " (data)") for n in a if a[n] != b[n]]
    if not diffs and list(a) != list(b):
        diffs.append("same tensors, different order")
    return diffs


def synthetic_moe(wd: Path, src: Path) -> None:
    """Peak RSS of converting a synthetic ~3B-parameter Mixtral-shaped bf16 checkpoint: experts are
    stacked expert by expert while streaming, so memory must not grow with their number."""
    big = wd / "synthetic-moe"
    t0 = time.perf_counter()
    n = write_synthetic(big, src, layers=26, hidden=2048, intermediate=2048, heads=16, kv_heads=8, experts=8)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    print(f"\nsynthetic MoE checkpoint: {n / 1e9:.2f}B parameters (8 experts x 26 layers), bf16, {size / 1e9:.1f} GB "
          f"(written in {time.perf_counter() - t0:.0f} s)\n")
    print("| checkpoint | target | llmops time | llmops peak RSS | target |")
    print("|---|---|---|---|---|")
    for target in ("gguf-f16", "gguf-q4"):
        t, m = run_measured(ours(big, target, wd / "moe.gguf"), wd)
        (wd / "moe.gguf").unlink(missing_ok=True)
        print(f"| synthetic MoE {n / 1e9:.2f}B bf16 | {target} | {t:.1f} s | {m / 1e6:.0f} MB | < 1000 MB |")
        sys.stdout.flush()
    shutil.rmtree(big, ignore_errors=True)


if __name__ == "__main__":
    main()
