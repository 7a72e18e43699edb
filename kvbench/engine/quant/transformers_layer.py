"""`TransformersQuantizedLayer`: a kvbench layer whose keys and values live in one of transformers' own
quantised cache layers (`QuantoQuantizedLayer` / `HQQQuantizedLayer`, the storage of `QuantizedCache`), as an
independent reference for kvbench's packed store. Positions, masks and the decode loop stay kvbench's, so the
row runs on exactly the same prompts and tokens as the others; quantisation, residual handling and storage are
transformers': the prefill is quantised as a whole when the layer takes it over, decode tokens collect in an fp
residual and, when it reaches `residual_length`, transformers dequantises everything, appends the residual and
quantises it all again. No eviction (composition goes through `kvbench.methods.quantized`).
"""

from __future__ import annotations

import copy

import torch

from kvbench.engine.cache import KVLayer
from kvbench.engine.quant.layer import StoredKVLayer


def tensor_tree_bytes(obj) -> int:
    """Bytes of every tensor inside `obj`: plain tensors, tensor subclasses that declare their inner tensors
    (`__tensor_flatten__`, e.g. quanto's packed QTensors), and tuples/lists/dicts of them (HQQ's (codes, meta))."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_tree_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_tree_bytes(value) for value in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_tree_bytes(value) for value in obj)
    return 0


class TransformersQuantizedLayer(StoredKVLayer):
    def __init__(self, inner) -> None:
        self.inner = inner
        super().__init__()

    @classmethod
    def from_layer(cls, layer: KVLayer, inner) -> TransformersQuantizedLayer:
        """Hand a plain layer's K/V (the prefill) to transformers' layer `inner`; keep kvbench's positions."""
        if layer.evicted:
            raise ValueError("transformers_quantized takes an uncompressed cache (no eviction)")
        new = cls(inner)
        # Everything but the plain layer's fp K/V buffers (transformers' layer holds the K/V from now on).
        skip = ("keys", "values", "_key_buf", "_value_buf")
        new.__dict__.update({name: value for name, value in vars(layer).items() if name not in skip})
        inner.update(layer.keys, layer.values)
        return new

    def _read(self, quantized, residual: torch.Tensor) -> torch.Tensor:
        parts = [self.inner._dequantize(quantized)] if quantized is not None else []
        if residual is not None and residual.dim() == 4:
            parts.append(residual)
        return torch.cat(parts, dim=-2).to(self.dtype)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if not self.is_initialized else self._read(self.inner._quantized_keys, self.inner.keys)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None and value.shape[-2] > 0:
            raise ValueError("transformers_quantized layers cannot be rewritten (no eviction)")

    @property
    def values(self) -> torch.Tensor | None:
        return None if not self.is_initialized else self._read(self.inner._quantized_values, self.inner.values)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self.keys = value

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, positions: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.inner.update(key_states, value_states)
        self.append_slot_state(positions, key_states.shape[-2])
        return keys, values

    def keep(self, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        raise ValueError("transformers_quantized layers cannot evict slots")

    def nbytes(self) -> int:
        inner = self.inner
        held = (inner._quantized_keys, inner._quantized_values, inner.keys, inner.values)
        return sum(tensor_tree_bytes(part) for part in held)

    def logical_nbytes(self) -> int:
        return self.nbytes()

    def copy(self) -> TransformersQuantizedLayer:
        """An independent copy. transformers' layer rebinds its tensors on every update (never writes into them),
        so a shallow copy of it may share them; quanto's tensors cannot be deep-copied."""
        other = TransformersQuantizedLayer(copy.copy(self.inner))
        other.__dict__.update({name: value for name, value in vars(self).items() if name != "inner"})
        other.positions = self.positions.clone()
        other.extras = {name: state.clone() for name, state in self.extras.items()}
        return other
