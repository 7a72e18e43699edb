"""Method registry: every module in `kvbench/methods/` is imported here, which registers its methods."""

import importlib
import pkgutil

from kvbench.methods.base import METHODS, CompressionContext, Method, build_method, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "CompressionContext", "Method", "build_method", "register_method"]
