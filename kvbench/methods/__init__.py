"""Method registry: importing this package registers every method in `kvbench/methods/`."""

from kvbench.methods import full, pyramidkv, random, snapkv, streamingllm, window  # noqa: F401  (registration)
from kvbench.methods.base import METHODS, CompressionContext, Method, build_method, register_method

__all__ = ["METHODS", "CompressionContext", "Method", "build_method", "register_method"]
