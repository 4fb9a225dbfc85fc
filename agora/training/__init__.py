"""Offline training helpers: they may import torch, and nothing that serves requests imports them."""
