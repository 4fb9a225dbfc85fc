"""Fine-tune the top layers of the router's sentence encoder for one binary label, in torch.

The injection detector reads segments with multilingual-e5-small's lower layers as they are and its top
layers tuned on agora's labeled set (``agora.router.semantic.injection.train``). The router runs the
encoder in numpy and never imports torch, so the tuning lives here and speaks numpy: it takes the
frozen lower layers' token states and the layers to start from, in ``SentenceEmbedder.layers``' layout
(weights stored ``[in, out]``), and returns the tuned layers in that layout. A logistic head on the
mean-pooled, normalised output trains with them and is dropped; the detector fits its own on the tuned
embeddings. Deterministic for a given host and thread count: seeded initialisation and batch order.
"""

from __future__ import annotations

import math

import numpy as np

from agora.router.semantic.embedder import SentenceEmbedder


def tune_layers(layers: list[tuple], states: list[np.ndarray], labels: np.ndarray, heads: int, eps: float,
                epochs: int = 3, lr: float = 5e-5, batch: int = 32, seed: int = 0) -> list[tuple]:  # fmt: skip
    """``layers`` tuned so that the pooled output of ``states[i]`` (``[tokens_i, dim]``) predicts ``labels[i]``."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [[torch.nn.Parameter(torch.tensor(np.asarray(a, np.float32))) for a in layer] for layer in layers]
    dim = params[0][0].shape[0]
    head = torch.nn.Linear(dim, 1)
    opt = torch.optim.AdamW([{"params": [p for layer in params for p in layer], "lr": lr},
                             {"params": head.parameters(), "lr": 1e-3}], weight_decay=0.01)  # fmt: skip
    lengths = np.array([len(s) for s in states])
    steps = epochs * math.ceil(len(states) / batch)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps))
    y = torch.tensor(np.asarray(labels, np.float32))
    for _ in range(epochs):
        # batches of similar lengths (little padding), in a shuffled order
        order = np.argsort(lengths + rng.uniform(0.0, 8.0, len(lengths)), kind="stable")
        batches = [order[i : i + batch] for i in range(0, len(order), batch)]
        rng.shuffle(batches)
        for b in batches:
            x, mask = (torch.from_numpy(a) for a in SentenceEmbedder.padded([states[i] for i in b]))
            logits = head(_pooled(params, x, mask, heads, eps) * 10.0).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return [tuple(p.detach().numpy().copy() for p in layer) for layer in params]


def _pooled(params, x, mask, heads: int, eps: float):
    """The layers in torch, as ``SentenceEmbedder.states`` runs them in numpy, then its pooling."""
    import torch
    import torch.nn.functional as F

    n, length, dim = x.shape
    d = dim // heads
    bias = ((1.0 - mask) * -1e9)[:, None, None, :]
    for qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, up_w, up_b, down_w, down_b, ln2_w, ln2_b in params:
        qkv = (x @ qkv_w + qkv_b).reshape(n, length, 3, heads, d).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(d) + bias, -1)
        ctx = (probs @ qkv[2]).transpose(1, 2).reshape(n, length, dim)
        x = F.layer_norm(ctx @ o_w + o_b + x, (dim,), ln1_w, ln1_b, eps)
        x = F.layer_norm(F.gelu(x @ up_w + up_b) @ down_w + down_b + x, (dim,), ln2_w, ln2_b, eps)
    pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-12)
