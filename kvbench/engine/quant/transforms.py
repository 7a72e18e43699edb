"""Fixed transforms for rotation-preconditioned KV codecs: Walsh-Hadamard matrices (RotateKV, OCTOPUS) and the
octahedral map of unit 3-vectors to the square (OCTOPUS). Storage-free: nothing here is cached, every matrix is
generated from its size (and seed)."""

from __future__ import annotations

import torch


def check_power_of_two(size: int, name: str = "hadamard size") -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size & (size - 1):
        raise ValueError(f"{name} {size!r} is not a power of two. Valid sizes: 1, 2, 4, 8, ..., 64, 128, 256, ...")


def hadamard(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised Sylvester-Walsh-Hadamard matrix H_size / sqrt(size): symmetric and orthogonal, so H H = I."""
    check_power_of_two(size)
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / size**0.5).to(dtype=dtype, device=device)


def random_signs(size: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """`size` seeded +-1 entries (fp32), the diagonal of a randomized Hadamard rotation H diag(signs)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (size,), generator=generator) * 2 - 1).to(torch.float32).to(device)


def _sign_not_zero(x: torch.Tensor) -> torch.Tensor:
    """sgn with sgn(0) = +1, so points on the octahedron's edges map and unmap consistently."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def octahedral_encode(u: torch.Tensor) -> torch.Tensor:
    """Unit vectors `[..., 3]` -> points of [-1, 1]^2 `[..., 2]` (standard octahedral encoding, the compression
    spec's OCTOPUS section): project onto the octahedron |x| + |y| + |z| = 1 and unfold the lower half outward."""
    p = u / u.abs().sum(dim=-1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    x, y, z = p.unbind(dim=-1)
    lower_a = (1 - y.abs()) * _sign_not_zero(x)
    lower_b = (1 - x.abs()) * _sign_not_zero(y)
    upper = z >= 0
    return torch.stack([torch.where(upper, x, lower_a), torch.where(upper, y, lower_b)], dim=-1)


def octahedral_decode(ab: torch.Tensor) -> torch.Tensor:
    """Points of [-1, 1]^2 `[..., 2]` -> unit vectors `[..., 3]`, the inverse of `octahedral_encode`."""
    a, b = ab.unbind(dim=-1)
    z = 1 - a.abs() - b.abs()
    lower = z < 0
    x = torch.where(lower, (1 - b.abs()) * _sign_not_zero(a), a)
    y = torch.where(lower, (1 - a.abs()) * _sign_not_zero(b), b)
    v = torch.stack([x, y, z], dim=-1)
    return v / v.norm(dim=-1, keepdim=True)
