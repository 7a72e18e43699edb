"""Storage-free building blocks of GEAR / RotateKV / OCTOPUS: Hadamard matrices, RoPE un-rotation of cached keys,
seeded power iteration, sparse outliers and the octahedral map."""

from __future__ import annotations

import pytest
import torch

from kvbench.engine.generation import prefill
from kvbench.engine.measure import Stopwatch
from kvbench.engine.quant.lowrank import extract_outliers, power_iteration
from kvbench.engine.quant.transforms import hadamard, octahedral_decode, octahedral_encode, random_signs
from kvbench.engine.rope import rope_keys, rotary_embedding, rotate_keys, unrotate_keys


@pytest.mark.parametrize("size", [1, 2, 4, 64, 128, 512])
def test_hadamard_is_orthogonal_and_its_own_inverse(size):
    h = hadamard(size)
    eye = torch.eye(size)
    assert torch.allclose(h @ h.T, eye, atol=1e-6)
    assert torch.equal(h, h.T)
    signs = random_signs(size, seed=3)
    rotation = h * signs  # H diag(signs)
    assert torch.allclose(rotation @ rotation.T, eye, atol=1e-6)
    assert torch.equal(signs, random_signs(size, seed=3)) and set(signs.tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("size", [0, 3, 6, 96, 192, -4, 2.0, True])
def test_hadamard_size_not_a_power_of_two_is_one_line(size):
    with pytest.raises(ValueError, match=r"is not a power of two\. Valid sizes: 1, 2, 4"):
        hadamard(size)


def test_unrotate_then_rerotate_cached_keys_round_trip(tiny_lm):
    pre = prefill(tiny_lm, list(range(3, 40)), 0, Stopwatch(tiny_lm.device))
    rotary = rotary_embedding(tiny_lm.model)
    layer = pre.cache.layers[1]
    layer.keep(torch.tensor([[0, 5, 9, 30], [2, 3, 17, 36]]))  # per-head positions, as after eviction
    keys, positions = layer.keys[0], layer.positions
    pre_rope = unrotate_keys(keys, positions, rotary)
    assert not torch.allclose(pre_rope, keys.float(), atol=1e-3)  # RoPE really was removed
    assert torch.allclose(rope_keys(pre_rope, positions, rotary), keys.float(), atol=1e-6)
    # fp32 round trip R(p) R(-p) k == k on random keys at large positions
    k = torch.randn(2, 5, keys.shape[-1])
    far = torch.tensor([[0, 1, 1000, 4095, 70000]] * 2)
    assert torch.allclose(rope_keys(unrotate_keys(k, far, rotary), far, rotary), k, atol=1e-5)
    # un-rotation agrees with the shift helper: un-rotating = moving by -p
    shifted = rotate_keys(keys[None], -positions, rotary.inv_freq)[0]
    assert torch.allclose(pre_rope, shifted.float(), atol=1e-5)


def test_power_iteration_recovers_an_exact_low_rank_matrix_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 96, 4, generator=generator), torch.randn(3, 4, 64, generator=generator)
    matrix = a @ b
    q, p = power_iteration(matrix, 4, 3, torch.Generator().manual_seed(1))
    assert q.shape == (3, 96, 4) and p.shape == (3, 64, 4)
    assert float((q @ p.transpose(-1, -2) - matrix).norm() / matrix.norm()) < 1e-4
    q2, p2 = power_iteration(matrix, 4, 3, torch.Generator().manual_seed(1))
    assert torch.equal(q, q2) and torch.equal(p, p2)
    noisy = matrix + 0.5 * torch.randn(matrix.shape, generator=generator)
    errors = []
    for rank in (0, 1, 2, 4, 8):
        q, p = power_iteration(noisy, rank, 3, torch.Generator().manual_seed(1))
        errors.append(float((noisy - q @ p.transpose(-1, -2)).norm()))
    assert errors == sorted(errors, reverse=True) and errors[0] > 2 * errors[3]


def test_outliers_are_the_extremes_and_restore_exactly():
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    filled, outliers = extract_outliers(x, 2, torch.float16)
    assert outliers.indices.dtype == torch.int16 and outliers.values.shape == (5, 4)
    for row in range(5):
        expected = set(x[row].float().topk(2).indices.tolist()) | set((-x[row].float()).topk(2).indices.tolist())
        assert set(outliers.indices[row].tolist()) == expected
    assert filled.float().abs().amax() <= x.float().abs().amax()
    assert torch.equal(outliers.restore(filled), x)
    same, none = extract_outliers(x, 0, torch.float16)
    assert torch.equal(same, x) and none.values.numel() == 0


def test_octahedral_map_round_trip():
    u = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = torch.cat([u, torch.eye(3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64)])
    u = u / u.norm(dim=-1, keepdim=True)
    ab = octahedral_encode(u)
    assert float(ab.abs().max()) <= 1.0
    assert float((octahedral_decode(ab) - u).abs().max()) < 1e-6
    u32 = u.float()
    assert float((octahedral_decode(octahedral_encode(u32)) - u32).abs().max()) < 1e-6
