"""Adapters that run kvbench's compressed caches inside other evaluation frameworks (lm-eval)."""
