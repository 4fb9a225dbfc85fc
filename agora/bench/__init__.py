"""`agora bench`: serving benchmarks against any OpenAI-compatible endpoint (no torch)."""
