"""The model matrix as a table: for each architecture of `tests/model_matrix.py` (tiny random config, fp32, CPU),
load it through `kvbench.api.load_model`, prefill a 100-token prompt with the full cache and compare with
transformers' eager forward (max |logit error| over every position) and 20 greedy tokens with `generate`.
An architecture kvbench refuses prints its one-line reason. Prints a Markdown table.

    python scripts/model_matrix_table.py [arch ...]
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kvbench import api
from kvbench.engine.architecture import UnsupportedModel
from kvbench.engine.cache import KVCache
from kvbench.engine.generation import forward_tokens, greedy_decode
from kvbench.engine.measure import Stopwatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from model_matrix import ARCHITECTURES, config_kwargs  # noqa: E402  (the matrix's configs live with its test)

PROMPT, NEW_TOKENS = 100, 20


def check(arch: str) -> tuple[str, str, str]:
    """(layer kinds, outcome, max logit error) for one architecture."""
    path = Path(tempfile.mkdtemp()) / "config.json"
    path.write_text(json.dumps({"model_type": arch, **config_kwargs(arch)}))
    try:
        lm = api.load_model(
            {"kind": "hf", "name": arch, "name_or_path": str(path), "config_only": True}, device="cpu", dtype="float32"
        )
    except UnsupportedModel as err:
        return "", f"refused: {err}", ""
    kinds = ", ".join(spec.kind.replace("_attention", "") for spec in lm.layer_specs)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(lm.model.config), attn_implementation="eager").eval()
    reference.load_state_dict(lm.model.state_dict())
    ids = torch.randint(3, 512, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        want = reference(torch.tensor([ids])).logits[0]
        cache = KVCache(lm.layer_specs)
        got = forward_tokens(lm, cache, ids, logits_to_keep=len(ids))
        error = (got - want).abs().max().item()
        generated = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT:]
    decoded = greedy_decode(lm, cache, got[-1], NEW_TOKENS, lambda n: None, Stopwatch(lm.device), stop_at_eos=False)
    same = decoded.tokens[: len(generated)] == generated.tolist()
    return kinds, "same tokens" if same else "DIFFERENT tokens", f"{error:.1e}"


def main(archs: list[str]) -> None:
    print("| architecture | layers | full cache vs transformers (20 greedy tokens) | max logit error |")
    print("| --- | --- | --- | --- |")
    for arch in archs or list(ARCHITECTURES):
        kinds, outcome, error = check(arch)
        print(f"| {arch} | {kinds} | {outcome} | {error} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
