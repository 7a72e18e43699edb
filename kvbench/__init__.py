"""kvbench: reproducible benchmarking of KV-cache compression for transformer LLMs."""

__version__ = "0.1.0"
