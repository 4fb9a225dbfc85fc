"""The single-node engine: scheduler, paged KV cache, model runner, sampler."""
