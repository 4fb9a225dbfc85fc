"""Decode and prefill speed on a GPU, agora vs transformers' generate, same weights.

    python benchmarks/gpu_decode.py --json benchmarks/results/gpu_h100.json

The device machine cannot fetch packages, so both models are built with random
weights in the exact shapes of SmolLM2-135M and Gemma 3 270M (speed does not
depend on the values). bf16, greedy, ignore_eos. Prints tokens/s and the fraction
of the GPU's memory-bandwidth limit (weights read once per decode step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

SHAPES = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "gemma3-270m": ("gemma3_text", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=256, max_position_embeddings=32768, sliding_window=512,
                                        query_pre_attn_scalar=256, tie_word_embeddings=True)),
}  # fmt: skip


def build(path: str, model_type: str, cfg: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=0, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters()) * 2  # bytes in bf16 (tied weights counted once)


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_agora(
    path: str, batch: int, new: int, prompt_len: int, repeats: int, eager: bool = False
) -> tuple[float, float]:
    from agora import LLM, SamplingParams

    llm = LLM(path, device="cuda", dtype="bfloat16", max_num_seqs=max(batch, 1), max_num_batched_tokens=8192,
              kv_cache_memory_bytes=8 << 30, max_model_len=4096, enforce_eager=eager)  # fmt: skip
    prompts = [[(i * 131 + j * 7) % 40000 + 10 for j in range(prompt_len)] for i in range(batch)]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    llm.generate(prompts, full)  # warm-up
    decode, prefill = [], []
    for _ in range(repeats):
        llm.engine.kv.reset_prefix_cache()
        t_pre = timed(lambda: llm.generate(prompts, one))
        llm.engine.kv.reset_prefix_cache()
        t_all = timed(lambda: llm.generate(prompts, full))
        prefill.append(batch * prompt_len / t_pre)
        decode.append(batch * (new - 1) / (t_all - t_pre))
    return statistics.median(decode), statistics.median(prefill)


def bench_hf(path: str, batch: int, new: int, prompt_len: int, repeats: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([[(i * 131 + j * 7) % 40000 + 10 for j in range(prompt_len)] for i in range(batch)]).cuda()
    mask = torch.ones_like(ids)

    def gen(n: int) -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)

    gen(new)
    decode, prefill = [], []
    for _ in range(repeats):
        t_pre = timed(lambda: gen(1))
        t_all = timed(lambda: gen(new))
        prefill.append(batch * prompt_len / t_pre)
        decode.append(batch * (new - 1) / (t_all - t_pre))
    return statistics.median(decode), statistics.median(prefill)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="GPU memory bandwidth, bytes/s (H100 SXM)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
               "prompt_len": args.prompt_len, "runs": []}  # fmt: skip
    for name in args.models:
        model_type, cfg = SHAPES[name]
        with tempfile.TemporaryDirectory() as path:
            weight_bytes = build(path, model_type, cfg)
            limit = args.bandwidth / weight_bytes  # decode steps/s if only weights were read
            for b in args.batch:
                systems = (
                    ("agora", bench_agora),
                    ("agora-eager", lambda *a: bench_agora(*a, eager=True)),
                    ("transformers", bench_hf),
                )
                for system, fn in systems:
                    dec, pre = fn(path, b, args.tokens, args.prompt_len, args.repeats)
                    row = {"model": name, "system": system, "batch": b, "decode_tok_s": round(dec, 1),
                           "prefill_tok_s": round(pre, 1), "decode_steps_per_s": round(dec / b, 1),
                           "bandwidth_limit_steps_per_s": round(limit, 1),
                           "fraction_of_bandwidth_limit": round(dec / b / limit, 4)}  # fmt: skip
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
