"""Semantic routing: signals (intent, PII, jailbreak) -> decisions, plus a semantic cache."""
