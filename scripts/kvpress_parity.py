"""Cross-check kvbench's methods against NVIDIA kvpress's presses: kept indices on one tiny model and one prompt.

Three steps, two virtual environments (kvpress pins an older transformers; it is never a kvbench dependency):

    # 1. kvbench's venv: a seeded random-weight Llama (conf/model/tiny_random) saved as a local model directory,
    #    and a fixed prompt of distinct random token ids
    python scripts/kvpress_parity.py prepare --dir /tmp/kvpress-parity
    # 2. a separate venv with kvpress==0.5.5: every press below at the same compression ratio, kept indices to JSON
    /tmp/kvpress-venv/bin/python scripts/kvpress_parity.py kvpress --dir /tmp/kvpress-parity
    # 3. kvbench's venv: the kvbench equivalents at budget = kvpress's kept count, compared per layer and KV head
    python scripts/kvpress_parity.py compare --dir /tmp/kvpress-parity --table docs/results/kvpress-parity-table.md

A case's kept indices are read from kvpress by wrapping the press's `compress` on the press object (keys and values
before and after, matched row by row: keys, or values where the press re-rotates keys; `masked_key_indices` for
presses that mask instead of removing) and from kvbench as the original positions each KV head holds after
`compress`. ThinK compares the kept key channels. "match" is the mean over layers and KV heads of
|kvbench kept & kvpress kept| / |kvpress kept|; "exact" means every layer and head holds the same set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PROMPT_LEN = 512  # a multiple of the non-causal chunk (256): kvpress pads its last chunk, kvbench does not
RATIO = 0.75  # kvpress compression_ratio: the fraction removed
WINDOW = 32  # Finch's question window: the last WINDOW prompt tokens play the question
THRESHOLD = -6.2  # DMS / threshold: knorm scores are -||k||; about half the keys have a norm above 6.2
DELIMITER = 5  # Finch's delimiter token for kvpress (prompt ids start at 10); its embedding hook removes it
SEED = 0

# name -> (kvpress press recipe, kvbench method spec). Recipes are read by `build_press` in the kvpress venv;
# specs by `kvbench.api.build_method`. SnapKV inside wrappers uses kvpress's defaults (window 64, kernel 5, avg).
SNAP = {"window": 64, "kernel": 5, "pool": "avg", "gqa_agg": "mean"}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "knorm": ({"press": "KnormPress"}, {"name": "knorm"}),
    "snapkv": ({"press": "SnapKVPress"}, {"name": "snapkv", **SNAP}),
    "pyramidkv": ({"press": "PyramidKVPress"}, {"name": "pyramidkv", **SNAP, "beta": 20.0}),
    "streamingllm": ({"press": "StreamingLLMPress"}, {"name": "streamingllm", "n_sink": 4, "decode_evict": False}),
    "tova": ({"press": "TOVAPress"}, {"name": "tova", "decode_evict": False}),
    "observed_attention": (
        {"press": "ObservedAttentionPress", "eager": True},
        {"name": "h2o", "recent_ratio": 0.0, "decode_evict": False},
    ),
    "expected_attention": ({"press": "ExpectedAttentionPress"}, {"name": "expected_attention"}),
    "random": ({"press": "RandomPress", "args": {"seed": SEED}}, {"name": "random"}),
    "keydiff": ({"press": "KeyDiffPress"}, {"name": "keydiff"}),
    "lagkv": ({"press": "LagKVPress"}, {"name": "lagkv"}),
    "leverage": ({"press": "LeverageScorePress"}, {"name": "leverage"}),
    "noncausal": ({"press": "NonCausalAttnPress"}, {"name": "noncausal", "scaled": False}),
    "compactor": ({"press": "CompactorPress"}, {"name": "compactor", "scaled": False}),
    "cur": ({"press": "CURPress"}, {"name": "cur"}),
    "cap": ({"press": "CapPress"}, {"name": "cap"}),
    "adakv": (
        {"press": "AdaKVPress", "inner": {"press": "SnapKVPress"}},
        {"name": "adakv", "base": "snapkv", "base_params": SNAP},
    ),
    "criticalkv": (
        {"press": "CriticalKVPress", "inner": {"press": "SnapKVPress"}},
        {"name": "criticalkv", "base": "snapkv", "base_params": SNAP},
    ),
    # kvpress's first stage takes int(0.5 x kept) slots by the base's scores, which rank SnapKV's window first: with
    # window 64 of 128 kept it holds just the window, i.e. kvbench's first_stage_ratio=0 on the selectable slots.
    # kvbench's SnapKV scores are sums over the 64 window rows (kvpress: means), so epsilon is 64 x 1e-4 here.
    "criticalkv_matched": (
        {"press": "CriticalKVPress", "inner": {"press": "SnapKVPress"}},
        {"name": "criticalkv", "base": "snapkv", "base_params": SNAP, "first_stage_ratio": 0.0, "epsilon": 0.0064},
    ),
    "criticaladakv": (
        {"press": "CriticalAdaKVPress", "inner": {"press": "SnapKVPress"}},
        {"name": "criticaladakv", "base": "snapkv", "base_params": SNAP},
    ),
    "chunkkv": (
        {"press": "ChunkKVPress", "inner": {"press": "SnapKVPress"}},
        {"name": "chunkkv", "base": "snapkv", "base_params": SNAP},
    ),
    "chunk_knorm": (
        {"press": "ChunkPress", "inner": {"press": "KnormPress"}, "args": {"chunk_length": 128}},
        {"name": "chunk", "base": "knorm", "chunk_length": 128},
    ),
    "per_layer_knorm": (
        {
            "press": "PerLayerCompressionPress",
            "inner": {"press": "KnormPress"},
            "layer_ratios": [0.5, 0.75, 0.875, 0.625],
            "hook_inner": True,  # its forward_hook sets the inner press's ratio and calls the inner press
        },
        # kept 256, 128, 64, 192 of 512 tokens: weights 1 - ratio, average budget 160
        {"name": "per_layer", "base": "knorm", "layer_weights": [0.5, 0.25, 0.125, 0.375]},
    ),
    "key_rerotation_knorm": (
        {"press": "KeyRerotationPress", "inner": {"press": "KnormPress"}},
        {"name": "key_rerotation", "base": "knorm"},
    ),
    "merging_snapkv": (
        {"press": "MergingPress", "inner": {"press": "SnapKVPress"}},
        {"name": "merging", "base": "snapkv", "base_params": SNAP},
    ),
    "finch": (
        {"press": "FinchPress", "delimiter": True},
        {"name": "finch"},
    ),
    "simlayerkv": (
        {"press": "SimLayerKVPress", "args": {"lazy_threshold": 0.15, "n_recent": 64, "n_last": 1, "n_initial": 4}},
        # kvbench's budget = a lazy layer's kept count, kvpress's n_initial + n_recent - n_last = 67
        {"name": "simlayerkv", "lazy_threshold": 0.15, "n_last": 1, "n_initial": 4, "budget": 67},
    ),
    "threshold_knorm": (
        {
            "press": "DMSPress",
            "inner": {"press": "KnormPress"},
            "args": {"threshold": THRESHOLD, "sliding_window_size": 128},
            "read_masks": True,  # its own forward_hook masks slots (`masked_key_indices`), no `compress`
        },
        {"name": "threshold", "base": "knorm", "threshold": THRESHOLD, "window": 128},
    ),
    "think": (
        {"press": "ThinKPress", "args": {"key_channel_compression_ratio": 0.5, "window_size": 32}, "channels": True},
        {"name": "think", "key_channel_compression_ratio": 0.5, "window": 32},
    ),
}


# kvbench methods that renumber the kept slots' positions (their keys re-rotated to 0..n-1).
RENUMBERED = {"key_rerotation", "finch"}

# ---------------------------------------------------------------- step 1: prepare (kvbench's venv)


def prepare(directory: Path) -> None:
    """Save the tiny model and the prompt (distinct token ids, so no two layer-0 values coincide)."""
    import torch

    import kvbench.api as kv

    lm = kv.load_model("tiny_random", device="cpu", dtype="float32")
    model_dir = directory / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)  # kvbench's hf loader reads it back; kvpress only needs token ids
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randperm(lm.model.config.vocab_size - 10, generator=generator)[:PROMPT_LEN] + 10
    (directory / "prompt.json").write_text(json.dumps({"input_ids": ids.tolist(), "ratio": RATIO}))
    print(f"saved {model_dir} and {directory / 'prompt.json'} ({PROMPT_LEN} tokens)")


# ---------------------------------------------------------------- step 2: kvpress (its own venv)


def build_press(recipe: dict[str, Any], ratio: float) -> Any:
    """A kvpress press from a recipe of `CASES` at `ratio`."""
    import kvpress

    cls = getattr(kvpress, recipe["press"])
    args = dict(recipe.get("args", {}))
    if "inner" in recipe:
        inner = build_press(recipe["inner"], ratio)
        if "layer_ratios" in recipe:
            return cls(press=inner, compression_ratios=recipe["layer_ratios"])
        press = cls(press=inner, **args)
        if recipe["press"] not in ("ChunkKVPress", "DMSPress"):  # these derive or refuse a ratio
            press.compression_ratio = ratio
        return press
    if recipe["press"] in ("ThinKPress", "SimLayerKVPress"):
        return cls(**args)
    press = cls(compression_ratio=ratio, **args)
    if recipe.get("delimiter"):  # Finch: an id absent from the prompt marks where the question starts
        press.delimiter_token_id = DELIMITER
    return press


def match_rows(before: Any, after: Any) -> list[list[int]]:
    """For each KV head, the row of `before [Hkv, n, d]` each row of `after [Hkv, m, d]` equals (sorted)."""
    import torch

    kept = []
    for head in range(before.shape[0]):
        distance = torch.cdist(after[head].double(), before[head].double())
        best = distance.min(dim=-1)
        if bool((best.values > 1e-6).any()):
            return []
        kept.append(sorted(best.indices.tolist()))
    return kept


def run_kvpress(directory: Path) -> None:
    """Apply every press of `CASES` to the saved model and prompt; kept indices per layer and KV head to JSON."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    prompt = json.loads((directory / "prompt.json").read_text())
    ids = torch.tensor([prompt["input_ids"]])
    models = {}
    results: dict[str, Any] = {}
    for name, (recipe, _) in CASES.items():
        attn = "eager" if recipe.get("eager") else "sdpa"
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(
                directory / "model", dtype=torch.float32, attn_implementation=attn
            ).eval()
        model = models[attn]
        press = build_press(recipe, prompt["ratio"])
        layers: dict[int, Any] = {}
        target = press.press if recipe.get("hook_inner") else press
        original = target.compress

        def compress(
            module, hidden_states, keys, values, attentions, kwargs, _original=original, _layers=layers, _recipe=recipe
        ):
            module.masked_key_indices = None
            new_keys, new_values = _original(module, hidden_states, keys, values, attentions, kwargs)
            entry: dict[str, Any] = {"len": keys.shape[2]}
            if _recipe.get("channels"):
                zero = (new_keys[0] == 0).all(dim=1)  # [Hkv, d]: pruned channels are zeroed
                entry["kept"] = [torch.nonzero(~z).flatten().tolist() for z in zero]
            elif getattr(module, "masked_key_indices", None) is not None:
                _, heads, slots = module.masked_key_indices
                mask = torch.ones(keys.shape[1], keys.shape[2], dtype=torch.bool)
                mask[heads, slots] = False
                entry["kept"] = [torch.nonzero(m).flatten().tolist() for m in mask]
            else:
                entry["kept"] = match_rows(keys[0], new_keys[0]) or match_rows(values[0], new_values[0])
            _layers[module.layer_idx] = entry
            return new_keys, new_values

        target.compress = compress
        given = ids
        if recipe.get("delimiter"):
            given = torch.cat([ids[:, :-WINDOW], torch.tensor([[DELIMITER]]), ids[:, -WINDOW:]], dim=1)
        for module in model.modules():
            if hasattr(module, "layer_idx"):
                module.masked_key_indices = None
        try:
            with torch.no_grad(), press(model):
                model(input_ids=given, past_key_values=DynamicCache(), use_cache=True)
            if recipe.get("read_masks"):
                for index, layer in enumerate(model.model.layers):
                    mask = torch.ones(model.config.num_key_value_heads, ids.shape[1], dtype=torch.bool)
                    if layer.self_attn.masked_key_indices is not None:
                        _, heads, slots = layer.self_attn.masked_key_indices
                        mask[heads, slots] = False
                    layers[index] = {"len": ids.shape[1], "kept": [torch.nonzero(m).flatten().tolist() for m in mask]}
            results[name] = {"layers": [layers[i] for i in sorted(layers)], "press": repr(press)[:300]}
        except Exception as err:  # noqa: BLE001 - one failing press must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        for module in model.modules():
            if hasattr(module, "masked_key_indices"):
                module.masked_key_indices = None
        status = results[name].get("error", "ok")
        print(f"{name}: {status}")
    import kvpress
    import transformers

    meta = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5"}
    meta["transformers"] = transformers.__version__
    meta["torch"] = torch.__version__
    (directory / "kvpress.json").write_text(json.dumps({"meta": meta, "cases": results}))
    print(f"wrote {directory / 'kvpress.json'}")


# ---------------------------------------------------------------- step 3: compare (kvbench's venv)


def kvbench_kept(
    lm: Any, ids: list[int], spec: dict[str, Any], budget: int | None
) -> tuple[list[list[list[int]]], Any]:
    """Kept original positions per layer and KV head after kvbench's `compress` (ThinK: kept key channels)."""
    from kvbench.api import build_method
    from kvbench.engine.cache import PAD_POSITION
    from kvbench.engine.measure import Stopwatch
    from kvbench.harness.options import RunOptions
    from kvbench.harness.runner import Job, compress_copy, shared_prefill

    method = build_method(spec)
    channels = spec["name"] == "think"
    if channels or not method.takes_budget:  # ThinK alone prunes channels only; threshold's amount is an outcome
        budget = None
    pre, observers = shared_prefill(lm, ids, [method], Stopwatch(lm.device))
    options = RunOptions(budgets=(budget,), kernels="torch", seed=SEED)
    job = Job(method=method, budget=budget, key="parity")
    stats = observers.get(id(method))
    kept = compress_copy(lm, pre, job, ids, options, Stopwatch(lm.device), stats, context_end=len(ids) - WINDOW)
    layers = []
    for index, layer in enumerate(kept.cache.layers):
        if channels:
            layers.append([sorted(c.tolist()) for c in layer.channels])
        elif spec["name"] in RENUMBERED and spec.get("rerotate", True):
            # Re-rotation renumbers the kept slots 0..n-1: their values (unchanged) say which slots they were.
            layers.append(match_rows(pre.cache.layers[index].values[0], layer.values[0]))
        else:
            layers.append([sorted(p[p != PAD_POSITION].tolist()) for p in layer.positions])
    return layers, kept.ctx.record


def spec_label(spec: dict[str, Any]) -> str:
    """`name k=v ...` for a method spec (kvpress's SnapKV defaults in base_params: `snapkv(64,5,avg)`)."""
    parts = [spec["name"]]
    for key, value in spec.items():
        if key == "name":
            continue
        if key == "base_params" and value == SNAP:
            parts[-1] += "(64,5,avg)"
            continue
        parts.append(f"{key}={json.dumps(value, separators=(',', ':')).strip(chr(34))}")
    return " ".join(parts)


def compare(directory: Path, table: Path | None) -> None:
    """Run each case's kvbench method and compare its kept sets with kvpress's; print (and write) the table."""
    import torch

    import kvbench.api as kv

    torch.manual_seed(SEED)
    peer = json.loads((directory / "kvpress.json").read_text())
    prompt = json.loads((directory / "prompt.json").read_text())
    ids = prompt["input_ids"]
    lm = kv.load_model({"kind": "hf", "name_or_path": str(directory / "model")}, device="cpu", dtype="float32")
    lines = [
        "| case | kvpress press | kvbench method | kept / head (layer 0) | match | exact |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, (recipe, spec) in CASES.items():
        case = peer["cases"].get(name, {"error": "not run"})
        label = f"`{recipe['press']}`" + (f"({recipe['inner']['press']})" if "inner" in recipe else "")
        method = "`" + spec_label(spec) + "`"
        if "error" in case or not case["layers"] or not all(entry["kept"] for entry in case["layers"]):
            why = case.get("error", "kept rows not recovered")
            lines.append(f"| {name} | {label} | {method} | - | kvpress failed: {why} | - |")
            print(f"{name}: kvpress {why}")
            continue
        theirs = [entry["kept"] for entry in case["layers"]]
        budget = int(round(sum(len(h) for layer in theirs for h in layer) / sum(len(layer) for layer in theirs)))
        spec = dict(spec)
        budget = spec.pop("budget", budget)
        try:
            ours, _ = kvbench_kept(lm, ids, spec, budget)
        except Exception as err:  # noqa: BLE001 - report the case and go on
            lines.append(f"| {name} | {label} | {method} | - | kvbench failed: {type(err).__name__}: {err} | - |")
            print(f"{name}: kvbench {type(err).__name__}: {err}")
            continue
        fractions, exact = [], True
        for layer_ours, layer_theirs in zip(ours, theirs, strict=True):
            for head_ours, head_theirs in zip(layer_ours, layer_theirs, strict=True):
                common = len(set(head_ours) & set(head_theirs))
                fractions.append(common / max(1, len(head_theirs)))
                exact = exact and head_ours == head_theirs
        match = sum(fractions) / len(fractions)
        kept0 = len(theirs[0][0])
        lines.append(f"| {name} | {label} | {method} | {kept0} | {match:.3f} | {'yes' if exact else 'no'} |")
        print(f"{name:24s} budget={budget:4d} match={match:.3f} exact={'yes' if exact else 'no'}")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    print(f"kvpress side: {peer['meta']}")
    if table is not None:
        table.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "kvpress", "compare"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/kvpress-parity"))
    parser.add_argument("--table", type=Path, default=None, help="compare: write the Markdown table here")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        sys.path.insert(0, str(ROOT))
        prepare(args.dir)
    elif args.step == "kvpress":
        run_kvpress(args.dir)
    else:
        sys.path.insert(0, str(ROOT))
        compare(args.dir, args.table)


if __name__ == "__main__":
    main()
