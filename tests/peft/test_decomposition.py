"""Top-K*r decomposition: exact and randomized against torch.linalg.svd, slicing into factors."""
from __future__ import annotations

import torch

from megatron_hdpissa.peft.decomposition import slice_factors, subspace_error, top_singular


def _decaying(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    s = torch.logspace(1, -2, k, dtype=torch.float64)
    return ((u[:, :k] * s) @ v[:, :k].t()).float()


def test_randomized_recovers_top_subspace():
    w = _decaying(512, 384)
    u_ref, s_ref, _ = torch.linalg.svd(w.double(), full_matrices=False)
    u, s, v = top_singular(w, 32, "randomized", seed=3)
    assert subspace_error(u_ref[:, :32], u) < 1e-2
    assert torch.allclose(s.double(), s_ref[:32], rtol=1e-3)
    # same seed, same result (it is computed once and broadcast, but must be reproducible)
    u2, _, _ = top_singular(w, 32, "randomized", seed=3)
    assert torch.equal(u, u2)


def test_small_matrix_falls_back_to_exact():
    w = _decaying(64, 48)
    exact = top_singular(w, 16, "exact")
    randomized = top_singular(w, 16, "randomized")  # q = 32 > 48 / 2
    for a, b in zip(exact, randomized):
        assert torch.equal(a, b)


def test_slices_reassemble_the_top_components():
    w = _decaying(96, 80)
    u, s, v = top_singular(w, 12, "exact")
    a, b = slice_factors(u, s, v, num_slices=3, rank=4)
    assert a.shape == (3, 4, 80) and b.shape == (3, 96, 4)
    recon = sum(b[k] @ a[k] for k in range(3))
    ref = (u * s) @ v.t()
    assert torch.allclose(recon, ref, atol=1e-5)
    # slices are mutually orthogonal: B_i^T B_j = 0 for i != j
    assert (b[0].t() @ b[1]).abs().max() < 1e-4
