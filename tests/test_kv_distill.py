"""KV distillation: keeping every slot changes nothing, the solve is the known (ridge) least-squares answer, the
fitting error never rises, lam -> infinity is the base, and over a real base the entries and bytes are the base's."""

from __future__ import annotations

import pytest
import torch

from kvbench.app import run
from kvbench.engine.kernels.window_attention import window_attention
from kvbench.harness.options import RunOptions
from kvbench.harness.results import ResultsStore
from kvbench.harness.runner import Job, run_sample
from kvbench.methods import build_method
from kvbench.methods.kv_distill import distill_layer, fit_bias, ridge_values, split_queries, valid_bases
from tests.helpers import needle_sample
from tests.test_app import cli, composed


def random_layer(seed: int, heads: int = 4, kv_heads: int = 2, length: int = 40, window: int = 12, dim: int = 8):
    """Window queries and a full layer of random K/V (positions 0..length-1, queries at the last positions)."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn((heads, window, dim), generator=gen)
    keys = torch.randn((kv_heads, length, dim), generator=gen)
    values = torch.randn((kv_heads, length, dim), generator=gen)
    positions = torch.arange(length).expand(kv_heads, -1)
    return queries, torch.arange(length - window, length), (keys, values, positions)


def subset(full, keep: torch.Tensor):
    """The kept slots `keep [Hkv, s]` of a full layer (what `KVLayer.keep` holds)."""
    keys, values, positions = full
    gather = keep[:, :, None].expand(-1, -1, keys.shape[-1])
    return keys.gather(1, gather), values.gather(1, gather), positions.gather(1, keep)


def random_keep(seed: int, kv_heads: int, length: int, kept: int, window: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    chosen = [torch.randperm(length - window, generator=gen)[: kept - window].sort().values for _ in range(kv_heads)]
    recent = torch.arange(length - window, length)
    return torch.stack([torch.cat([c, recent]) for c in chosen])


def test_keeping_every_slot_gives_no_correction():
    queries, qpos, full = random_layer(0)
    for bias_steps in (0, 3):
        fit = distill_layer(queries, qpos, full, full, 0.35, 0.1, "alternate", bias_steps)
        if bias_steps == 0:  # the kept weights are the full ones: the residual, hence the change, is exactly 0
            assert torch.equal(fit.values, full[1].double())
        assert torch.allclose(fit.values, full[1].double(), atol=1e-6)
        assert fit.errors["fit_before"] == 0 and fit.errors["fit_after"] < 1e-12
        assert fit.bias is None or float(fit.bias.abs().max()) < 1e-6
    # lam = 0 (pseudo-inverse path) too
    fit = distill_layer(queries, qpos, full, full, 0.35, 0.0, "none")
    assert torch.allclose(fit.values, full[1].double(), atol=1e-6)


def test_hand_made_solve_is_the_least_squares_answer():
    """A 3 x 2 case by hand: A = [[1, 0], [0, 1], [0.5, 0.5]], O = [[1], [2], [2]], V = [[0], [0]].
    Plain least squares (lam = 0): A^T A = [[1.25, .25], [.25, 1.25]], A^T O = [2, 3], det 1.5 -> X = [7/6, 13/6]."""
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]], dtype=torch.float64)
    o = torch.tensor([[[1.0], [2.0], [2.0]]], dtype=torch.float64)
    v = torch.zeros((1, 2, 1), dtype=torch.float64)
    x = ridge_values(a, o, v, 0.0)
    assert torch.allclose(x[0, :, 0], torch.tensor([7 / 6, 13 / 6], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(x, torch.linalg.lstsq(a, o).solution, atol=1e-12)
    # Ridge: lam' = lam * mean diag(A^T A) = 0.2 * 1.25; the augmented system [A; sqrt(lam') I] X = [O - A V; 0].
    v = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    damp = 0.2 * 1.25
    aug_a = torch.cat([a[0], damp**0.5 * torch.eye(2, dtype=torch.float64)])
    aug_b = torch.cat([o[0] - a[0] @ v[0], torch.zeros((2, 1), dtype=torch.float64)])
    expected = v[0] + torch.linalg.lstsq(aug_a, aug_b).solution
    assert torch.allclose(ridge_values(a, o, v, 0.2)[0], expected, atol=1e-12)


def test_layer_solve_matches_explicit_normal_equations_per_kv_head():
    """distill_layer's values are the ridge normal-equation solution built by hand from the window attention (rows
    of every query head of the group, fitting queries only)."""
    queries, qpos, full = random_layer(3)
    keep = random_keep(3, 2, 40, 16, 4)
    kept = subset(full, keep)
    lam = 0.05
    fit = distill_layer(queries, qpos, full, kept, 0.35, lam, "alternate")
    fit_idx, _ = split_queries(queries.shape[1], "alternate")
    target = window_attention(queries, full[0], qpos, full[2], 0.35).double() @ full[1].double().repeat_interleave(
        2, dim=0
    )
    weights = window_attention(queries, kept[0], qpos, kept[2], 0.35).double()
    for h in range(2):
        a = torch.cat([weights[g, fit_idx] for g in (2 * h, 2 * h + 1)])
        o = torch.cat([target[g, fit_idx] for g in (2 * h, 2 * h + 1)])
        v = kept[1][h].double()
        gram = a.T @ a
        damped = gram + lam * gram.diagonal().mean() * torch.eye(16, dtype=torch.float64)
        expected = v + torch.linalg.solve(damped, a.T @ (o - a @ v))
        assert torch.allclose(fit.values[h], expected, atol=1e-10)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("bias_steps", [0, 4])
def test_fitting_error_never_increases(seed, bias_steps):
    queries, qpos, full = random_layer(seed, length=30 + seed, window=10)
    kept = subset(full, random_keep(seed, 2, 30 + seed, 8 + seed, 3))
    for lam in (0.0, 0.01, 1.0):
        fit = distill_layer(queries, qpos, full, kept, 0.4, lam, "alternate", bias_steps, torch.float32)
        assert fit.errors["fit_after"] <= fit.errors["fit_before"] * (1 + 1e-6) + 1e-12
        assert fit.errors["fit_after"] < fit.errors["fit_before"]  # random data: a real improvement


def test_bias_steps_only_lower_the_error():
    queries, qpos, full = random_layer(5)
    kept = subset(full, random_keep(5, 2, 40, 10, 3))
    keys, values, positions = kept
    logits = window_attention(queries, keys, qpos, positions, 0.4).double().unflatten(0, (2, 2)).flatten(1, 2).log()
    target = window_attention(queries, full[0], qpos, full[2], 0.4).double().unflatten(0, (2, 2)).flatten(1, 2)
    target = target @ full[1].double()
    base = (torch.softmax(logits, -1).nan_to_num(0) @ values.double() - target).square().sum(dim=(1, 2))
    bias = fit_bias(logits, values.double(), target, 6)
    after = (torch.softmax(logits + bias[:, None], -1).nan_to_num(0) @ values.double() - target).square().sum((1, 2))
    assert bool((after <= base).all()) and bool((after < base).any())


def test_infinite_lambda_leaves_the_values():
    queries, qpos, full = random_layer(7)
    kept = subset(full, random_keep(7, 2, 40, 12, 4))
    fit = distill_layer(queries, qpos, full, kept, 0.35, 1e12, "alternate")
    assert torch.allclose(fit.values, kept[1].double(), atol=1e-9)


def test_split_queries():
    fit, held = split_queries(6, "alternate")
    assert fit.tolist() == [1, 3, 5] and held.tolist() == [0, 2, 4]
    fit, held = split_queries(8, "last")
    assert fit.tolist() == [0, 1, 2, 3, 4, 5] and held.tolist() == [6, 7]
    fit, held = split_queries(5, "none")
    assert fit.tolist() == [0, 1, 2, 3, 4] and held.tolist() == []


@pytest.mark.parametrize("compress", ["prompt", "context"])
def test_over_a_base_entries_and_bytes_are_the_base_and_the_record_is_filled(tiny_lm, compress):
    jobs = [Job(build_method({"name": "full"}), None, "full")]
    for budget in (32, 48):
        jobs.append(Job(build_method({"name": "snapkv"}), budget, f"snapkv:{budget}"))
        jobs.append(Job(build_method({"name": "kv_distill"}), budget, f"distill:{budget}"))
        jobs.append(Job(build_method({"name": "kv_distill", "lam": 1e12}), budget, f"inf:{budget}"))
        jobs.append(Job(build_method({"name": "kv_distill", "bias": True}), budget, f"bias:{budget}"))
    jobs.append(Job(build_method({"name": "h2o"}), 32, "h2o"))
    jobs.append(Job(build_method({"name": "kv_distill", "base": "h2o"}), 32, "distill:h2o"))
    jobs.append(Job(build_method({"name": "adakv"}), 32, "adakv"))
    jobs.append(Job(build_method({"name": "kv_distill", "base": "adakv"}), 32, "distill:adakv"))
    rows = {
        job.key: row
        for job, row in run_sample(
            tiny_lm, needle_sample(8), jobs, RunOptions(compress=compress, seed=0, fail_fast=True)
        )
    }
    pairs = [(f"snapkv:{b}", f"{kind}:{b}") for b in (32, 48) for kind in ("distill", "inf", "bias")]
    pairs += [("h2o", "distill:h2o"), ("adakv", "distill:adakv")]
    for base, distill in pairs:
        assert rows[distill]["compressed"], distill
        record = rows[distill]["method_record"]
        for key in ("kept_per_layer_compressed", "kept_entries"):
            assert rows[distill][key] == rows[base][key], (distill, key)
        # A logit bias is held with the slots (4 bytes per slot, KV head and layer) and counted in kv_bytes.
        bias = record.get("kv_distill_bias_bytes", 0)
        assert bias > 0 if distill.startswith("bias") else bias == 0, distill
        assert rows[distill]["kv_bytes_compressed"] == rows[base]["kv_bytes_compressed"] + bias, distill
        if not bias:
            assert rows[distill]["kv_bytes"] == rows[base]["kv_bytes"], distill
        assert record["kv_distill_fit_err_after"] <= record["kv_distill_fit_err_before"] * (1 + 1e-6), distill
        assert record["kv_distill_heldout_err_before"] > 0 and record["kv_distill_solve_s"] >= 0
        assert record["kv_distill_fit_queries"] + record["kv_distill_heldout_queries"] == 32  # snapkv's window
    for b in (32, 48):  # lam -> infinity: the base's cache, so its greedy output
        assert rows[f"inf:{b}"]["output_ids"] == rows[f"snapkv:{b}"]["output_ids"]
        assert "kv_distill_bias_bytes" in rows[f"bias:{b}"]["method_record"]
    assert (
        rows["distill:32"]["method_record"]["kv_distill_fit_err_after"]
        < 0.9 * (rows["distill:32"]["method_record"]["kv_distill_fit_err_before"])
    )


def test_bad_input_is_one_line():
    valid = ", ".join(valid_bases())
    assert "snapkv" in valid and "h2o" in valid and "kivi" not in valid and "full" not in valid
    for base in ("full", "kivi", "razor", "kv_distill"):
        message = rf"^kv_distill cannot wrap '{base}' \(it does not keep a subset of the cache's slots as plain K/V\)"
        with pytest.raises(ValueError, match=message + r"\. Valid bases: .*snapkv.*\.$"):
            build_method({"name": "kv_distill", "base": base})
    with pytest.raises(ValueError, match=r"^unknown kv_distill base 'snapk'\. Valid bases: .*snapkv"):
        build_method({"name": "kv_distill", "base": "snapk"})
    with pytest.raises(ValueError, match=r"^unknown holdout 'odd'\. Valid holdouts: alternate, last, none\.$"):
        build_method({"name": "kv_distill", "holdout": "odd"})
    with pytest.raises(ValueError, match=r"^method.lam must be >= 0, got -1.0$"):
        build_method({"name": "kv_distill", "lam": -1.0})


def test_cli_composes_over_a_base_with_a_budget_sweep(tmp_path):
    """`method=kv_distill method.base=snapkv budget=[32,48]` through the app (one prefill per sample shared by the
    sweep): the same entries and bytes per budget as snapkv alone, the correction recorded in every row."""
    rows = {}
    for name, overrides in (("snapkv", ["method=snapkv"]), ("distill", ["method=kv_distill", "method.base=snapkv"])):
        result = run(composed(tmp_path / name, *overrides, "budget=[32,48]", "max_samples=1"))
        rows[name] = {row["budget"]: row for row in ResultsStore(result["run_dir"]).rows() if row["budget"]}
    assert sorted(rows["distill"]) == [32, 48]
    for budget, row in rows["distill"].items():
        assert row["status"] == "ok" and row["method"] == "kv_distill", row["method"]
        assert row["kept_entries_compressed"] == rows["snapkv"][budget]["kept_entries_compressed"]
        assert row["kv_bytes_compressed"] == rows["snapkv"][budget]["kv_bytes_compressed"]
        record = row["method_record"]
        assert record["kv_distill_fit_err_after"] < record["kv_distill_fit_err_before"]


def test_cli_bad_base_is_one_line(tmp_path):
    result = cli(tmp_path, "model=tiny_random", "method=kv_distill", "method.base=full")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "kv_distill cannot wrap 'full'" in result.stderr and "Valid bases: adakv" in result.stderr
