"""Every conf/method/*.yaml runs with its defaults on every shipped model: the tiny model (head dim 16, every
method run on one sample), SmolLM2 (head dim 64, slow) and the two 8B architectures (head dim 128, the
model-dependent checks on their published configs: their random weights are built only on a GPU).

Quantisers' groups along channels hold at most one head vector (`channel_group_size`): kivi's default 32 stores the
tiny model's values in groups of 16 channels, identical to asking for 16, and the row records both sizes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoConfig

import kvbench.api as kv
from kvbench.config import CONF_DIR, group_options
from kvbench.engine.models import head_dim_of
from kvbench.engine.quant.codecs import channel_group_size
from kvbench.methods.prefixkv import write_calibration
from kvbench.methods.transformers_quantized import backend_available
from tests.helpers import needle_sample

QUANTISERS = ("kivi", "rtn", "gear", "rotatekv")
# The quantisers over an eviction base, as `method=kivi method.base=snapkv` composes them.
COMPOSED = [{"name": name, "base": "snapkv"} for name in QUANTISERS]
SHIPPED_CONFIGS = {"llama31_8b_random": "llama31_8b.json", "qwen25_7b_random": "qwen25_7b.json"}


def method_specs() -> list[str | dict]:
    return [*group_options("method"), *COMPOSED]


def spec_id(spec: str | dict) -> str:
    return spec if isinstance(spec, str) else f"{spec['name']}+{spec['base']}"


def run_defaults(lm: kv.LoadedModel, spec: str | dict, tmp_path, monkeypatch) -> dict:
    """One needle sample through the method built from its YAML defaults alone (the row of its first budget)."""
    name = spec if isinstance(spec, str) else spec["name"]
    if name == "transformers_quantized" and not backend_available("quanto"):
        pytest.skip("transformers_quantized needs the optional extra kvbench[quantized] (optimum-quanto)")
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    if name == "prefixkv":  # its documented prerequisite: a per-model calibration (python -m kvbench.calibrate)
        text = " ".join(f"Line {i}: the fox number {i % 13} jumps over the lazy dog." for i in range(400))
        write_calibration(lm, None, text, "test text", 4, 512)
    method = kv.build_method(spec)
    rows = kv.evaluate(lm, [needle_sample(4)], [method], budgets=[32], include_full=False)
    return rows[0]


@pytest.mark.parametrize("spec", method_specs(), ids=spec_id)
def test_every_method_runs_with_its_defaults_on_the_tiny_model(tiny_lm, spec, tmp_path, monkeypatch):
    row = run_defaults(tiny_lm, spec, tmp_path, monkeypatch)
    assert row["status"] == "ok", row.get("error")
    assert len(row["output_ids"]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("spec", method_specs(), ids=spec_id)
def test_every_method_runs_with_its_defaults_on_smollm2(smollm2_lm, spec, tmp_path, monkeypatch):
    row = run_defaults(smollm2_lm, spec, tmp_path, monkeypatch)
    assert row["status"] == "ok", row.get("error")


@pytest.mark.parametrize("model", sorted(SHIPPED_CONFIGS))
def test_every_method_passes_its_model_checks_on_the_8b_architectures(model):
    config = AutoConfig.from_pretrained(str(CONF_DIR / "model_configs" / SHIPPED_CONFIGS[model]))
    assert head_dim_of(config) == 128
    for spec in method_specs():
        if spec == "transformers_quantized" and not backend_available("quanto"):
            continue
        kv.check_model(SimpleNamespace(config=config), [kv.build_method(spec)])  # only its config is read


def test_channel_groups_larger_than_the_head_dim_hold_one_head_vector():
    assert [channel_group_size(32, d) for d in (16, 32, 64, 128)] == [16, 32, 32, 32]
    assert channel_group_size(64, None) == 64  # no model yet: as configured


@pytest.mark.parametrize("name", ["rtn", "rotatekv"])
def test_a_default_group_above_the_head_dim_equals_asking_for_the_head_dim(tiny_lm, name, tmp_path, monkeypatch):
    """rtn and rotatekv group channels only: their default (32 / 64) on head dim 16 is the same codec as 16, so the
    rows agree to the byte and token; the row records the size used."""
    monkeypatch.setenv("KVBENCH_CACHE", str(tmp_path / "cache"))
    sample = needle_sample(6)
    default, explicit = kv.evaluate(
        tiny_lm, [sample], [kv.build_method(name), kv.build_method(name, group_size=16)], include_full=False
    )
    assert default["method_params"]["group_size"] > 16  # configured as shipped
    assert default["method_record"]["quant"]["group_size"] == 16  # used
    assert default["output_ids"] == explicit["output_ids"]
    assert default["kv_bytes"] == explicit["kv_bytes"]


def test_kivi_keys_keep_their_token_groups_and_values_meet_the_head_dim(tiny_lm):
    (row,) = kv.evaluate(tiny_lm, [needle_sample(4)], [kv.build_method("kivi")], include_full=False)
    quant = row["method_record"]["quant"]
    assert (quant["group_size"], quant["v_group_size"], quant["residual_length"]) == (32, 16, 128)
    assert (quant["key_axis"], quant["value_axis"]) == ("token", "channel")
