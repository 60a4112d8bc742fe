"""Property tests of the pure init functions (SPEC §0, §2): what the factors *mean*, not just that they run.

Every reference quantity is computed independently here in fp64 (torch.linalg.svd / eigh). Singular vectors have
arbitrary signs, so subspaces are compared through their orthogonal projectors and products through sign-invariant
quantities (U S Vᵀ, B·Bᵀ, Aᵀ·A, B·A where the method fixes it).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import lorafa
from lorafa import LayerStats, init_factors, resolve_method
from lorafa.methods import METHODS, randomized_svd, top_svd
from lorafa.methods.lora_ga import DIRECTIONS, split_pairs

M, N, R = 24, 16, 3  # tall weight (out > in)
SHAPES = [(M, N), (12, 20)]  # ... and one with m < n
S_LORA = 2.0  # LoRA scaling s = α/r used throughout


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """rows × cols, orthonormal columns, fp64."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=_gen(seed), dtype=torch.float64)).Q


def with_spectrum(m: int, n: int, svals, seed: int) -> torch.Tensor:
    """An fp32 m × n matrix with the given (distinct, descending) singular values, random singular vectors."""
    k = min(m, n)
    s = torch.as_tensor(svals, dtype=torch.float64)
    assert s.numel() == k
    return (orthonormal(m, k, seed) * s) @ orthonormal(n, k, seed + 1000).T


def spd(d: int, seed: int, lo: float = 1e-2, hi: float = 1.0) -> torch.Tensor:
    """An fp32 d × d SPD matrix with log-spaced, distinct eigenvalues in [lo, hi]."""
    Q = orthonormal(d, d, seed)
    evals = torch.logspace(math.log10(hi), math.log10(lo), d, dtype=torch.float64)
    return ((Q * evals) @ Q.T).float()


def grad_matrix(m: int, n: int, seed: int = 1) -> torch.Tensor:
    """A gradient with well separated singular values (so the singular subspaces are well defined)."""
    return with_spectrum(m, n, torch.linspace(10.0, 1.0, min(m, n)), seed).float()


def weight_matrix(m: int, n: int, seed: int = 2) -> torch.Tensor:
    return with_spectrum(m, n, torch.linspace(5.0, 0.5, min(m, n)), seed).float()


def full_stats(m: int, n: int, seed: int = 3, n_tokens: int = 64, n_batches: int = 4) -> LayerStats:
    """Every statistic kind (grad, act, kfac) for an m × n layer."""
    return LayerStats(grad=grad_matrix(m, n, seed), in_cov=spd(n, seed + 1), out_cov=spd(m, seed + 2),
                      n_tokens=n_tokens, n_batches=n_batches)


def projector(X: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the column span of X (fp64)."""
    Q = torch.linalg.qr(X.double()).Q
    return Q @ Q.T


def svd64(X: torch.Tensor):
    return torch.linalg.svd(X.double(), full_matrices=False)


def truncate(X: torch.Tensor, r: int) -> torch.Tensor:
    """[X]_r in fp64."""
    U, S, Vh = svd64(X)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """‖actual − expected‖_F ≤ tol · ‖expected‖_F (scale-free, for matrices of any magnitude)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    err = float(torch.linalg.norm(actual - expected))
    ref = float(torch.linalg.norm(expected))
    assert err <= tol * max(ref, 1e-30), f"relative error {err / max(ref, 1e-30):.3e} > {tol:.1e}"


def damped(cov: torch.Tensor, reg: float, relative: bool) -> torch.Tensor:
    """SPEC §2.2's cov_λ in fp64."""
    cov = cov.double()
    d = cov.shape[0]
    lam = reg * torch.trace(cov) / d if relative else reg
    return cov + lam * torch.eye(d, dtype=torch.float64)


def sqrtm(X: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    w, Q = torch.linalg.eigh(X.double())
    return (Q * w.pow(power)) @ Q.T


def product(res) -> torch.Tensor:
    return res.B.double() @ res.A.double()


# ----------------------------------------------------------------------------------------------------------------------
# shapes, dtypes, offsets: every registered method
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_shapes_dtype_and_offset_flag(method, shape):
    m, n = shape
    w = weight_matrix(m, n)
    extra = {"tuned": w + torch.randn(m, n, generator=torch.Generator().manual_seed(5))} if method == "extract" else {}
    if method == "goat":  # R experts of rank 1
        extra = {"num_experts": R}
    res = init_factors(method, w, full_stats(m, n), rank=R, scaling=S_LORA, **extra)
    assert res.A.shape == (R, n) and res.B.shape == (m, R)
    assert res.A.dtype == torch.float32 and res.B.dtype == torch.float32
    assert torch.isfinite(res.A).all() and torch.isfinite(res.B).all()
    assert res.subtract is METHODS[method].subtracts
    # a rank-r adapter must not be degenerate: A has full row rank
    assert torch.linalg.matrix_rank(res.A.double()) == R


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", ["pissa", "lora_ga", "lora_fa"])
def test_factors_are_fp32_whatever_the_weight_dtype(method, dtype):
    res = init_factors(method, weight_matrix(M, N).to(dtype), full_stats(M, N), rank=R, scaling=S_LORA)
    assert res.A.dtype == torch.float32 and res.B.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# weight-only methods: lora, pissa, milora
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pissa_product_is_best_rank_r_approximation(shape):
    m, n = shape
    W = weight_matrix(m, n)
    res = init_factors("pissa", W, rank=R, scaling=S_LORA)
    assert_rel_close(S_LORA * product(res), truncate(W, R))
    # the residual W − s·B·A holds exactly the remaining spectrum
    _, S, _ = svd64(W)
    resid = svd64(W.double() - S_LORA * product(res))[1]
    torch.testing.assert_close(resid[: min(m, n) - R], S[R:], rtol=1e-4, atol=1e-5)
    # balanced: B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ  =>  column norms of B = row norms of A = √(σ_i/s)
    expect = torch.sqrt(S[:R] / S_LORA)
    torch.testing.assert_close(res.A.double().norm(dim=1), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.B.double().norm(dim=0), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_milora_product_is_bottom_r_part(shape):
    m, n = shape
    W = weight_matrix(m, n)
    res = init_factors("milora", W, rank=R, scaling=S_LORA)
    U, S, Vh = svd64(W)
    bottom = (U[:, -R:] * S[-R:]) @ Vh[-R:]
    assert_rel_close(S_LORA * product(res), bottom)
    # and the base after the offset keeps the r principal pairs
    assert_rel_close(W.double() - S_LORA * product(res), (U[:, :-R] * S[:-R]) @ Vh[:-R])


def test_lora_is_kaiming_uniform_with_zero_b_and_seeded():
    W = weight_matrix(M, N)
    res = init_factors("lora", W, rank=R, scaling=S_LORA, seed=5)
    assert torch.count_nonzero(res.B) == 0
    bound = 1 / math.sqrt(N)
    assert res.A.abs().max() <= bound
    assert res.A.abs().max() > 0.5 * bound  # uses the range, not a degenerate/shrunk draw
    assert torch.equal(res.A, init_factors("lora", W, rank=R, scaling=S_LORA, seed=5).A)
    assert not torch.allclose(res.A, init_factors("lora", W, rank=R, scaling=S_LORA, seed=6).A)


# ----------------------------------------------------------------------------------------------------------------------
# activation methods: corda, eva
# ----------------------------------------------------------------------------------------------------------------------


def corda_reference(W, cov, rank, reg=0.01, top=True):
    """U_r S_r V̂_rᵀ Σ_λ⁻¹ with SVD(W Σ_λ) = U S V̂ᵀ and Σ_λ = Σ + reg·mean(diag Σ)·I (fp64)."""
    cov = cov.double()
    cov_l = cov + reg * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=torch.float64)
    U, S, Vh = svd64(W.double() @ cov_l)
    pick = slice(0, rank) if top else slice(-rank, None)
    return (U[:, pick] * S[pick]) @ Vh[pick] @ torch.linalg.inv(cov_l)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("corda_method", ["ipm", "kpm"])
def test_corda_product_matches_covariance_weighted_svd(shape, corda_method):
    m, n = shape
    W, st = weight_matrix(m, n), full_stats(m, n)
    res = init_factors("corda", W, st, rank=R, scaling=S_LORA, corda_method=corda_method)
    assert_rel_close(S_LORA * product(res), corda_reference(W, st.in_cov, R, top=corda_method == "ipm"), tol=1e-4)
    # the product genuinely depends on Σ: it is not PiSSA's / MiLoRA's product
    plain = truncate(W, R) if corda_method == "ipm" else W.double() - truncate(W, min(m, n) - R)
    assert torch.linalg.norm(S_LORA * product(res) - plain) > 1e-2 * torch.linalg.norm(plain)


def test_corda_reg_option_is_used():
    W, st = weight_matrix(M, N), full_stats(M, N)
    res = init_factors("corda", W, st, rank=R, scaling=S_LORA, reg=0.3)
    assert_rel_close(S_LORA * product(res), corda_reference(W, st.in_cov, R, reg=0.3))
    default = init_factors("corda", W, st, rank=R, scaling=S_LORA)
    assert not torch.allclose(product(res), product(default), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_corda_ipm_full_rank_reconstructs_weight(shape):
    m, n = shape
    W, st = weight_matrix(m, n), full_stats(m, n)
    res = init_factors("corda", W, st, rank=min(m, n), scaling=S_LORA)
    assert_rel_close(S_LORA * product(res), W, tol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_eva_a_spans_top_eigenvectors_of_input_covariance(shape):
    m, n = shape
    st = full_stats(m, n)
    res = init_factors("eva", weight_matrix(m, n), st, rank=R, scaling=S_LORA)
    assert torch.count_nonzero(res.B) == 0
    A = res.A.double()
    torch.testing.assert_close(A @ A.T, torch.eye(R, dtype=torch.float64), atol=1e-5, rtol=0)
    evals, evecs = torch.linalg.eigh(st.in_cov.double())  # ascending
    top = evecs[:, -R:]
    torch.testing.assert_close(A.T @ A, top @ top.T, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# lora_ga (SPEC §2.1)
# ----------------------------------------------------------------------------------------------------------------------


def ga_indices(direction: str, r: int) -> tuple[list[int], list[int]]:
    """SPEC §2.1's split, written out independently: (pairs for A = rows of Vᵀ, pairs for B = columns of U)."""
    return {
        "ArB2r": (list(range(r)), list(range(r, 2 * r))),
        "A2rBr": (list(range(r, 2 * r)), list(range(r))),
        "ArBr": (list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))),
    }[direction]


def ga(W, G, **kw):
    kw.setdefault("rank", R)
    kw.setdefault("scaling", S_LORA)
    return init_factors("lora_ga", W, LayerStats(grad=G), **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_lora_ga_subspaces_follow_direction(direction, shape):
    m, n = shape
    W, G = weight_matrix(m, n), grad_matrix(m, n)
    res = ga(W, G, direction=direction, scale="unit")
    U, _, Vh = svd64(G)
    a_idx, b_idx = ga_indices(direction, R)
    P_A, P_B = Vh[a_idx].T @ Vh[a_idx], U[:, b_idx] @ U[:, b_idx].T
    torch.testing.assert_close(projector(res.A.T), P_A, atol=1e-5, rtol=0)
    torch.testing.assert_close(projector(res.B), P_B, atol=1e-5, rtol=0)
    # with `unit` the rows/columns are orthonormal, so Aᵀ·A and B·Bᵀ *are* the projectors
    torch.testing.assert_close(res.A.double().T @ res.A.double(), P_A, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.B.double() @ res.B.double().T, P_B, atol=1e-5, rtol=0)
    assert res.info["direction"] == direction


def test_lora_ga_direction_can_be_given_as_method_name():
    W, G = weight_matrix(M, N), grad_matrix(M, N)
    for d in ("A2rBr", "arbr"):
        by_name = init_factors(d, W, LayerStats(grad=G), rank=R, scaling=S_LORA)
        by_option = ga(W, G, direction=d)
        assert torch.equal(by_name.A, by_option.A) and torch.equal(by_name.B, by_option.B)
    # the default direction is ArB2r
    assert torch.equal(ga(W, G).A, ga(W, G, direction="ArB2r").A)


def _matched_pairs(X: torch.Tensor, basis: torch.Tensor) -> list[int]:
    """For each unit vector (column of X), the index of the basis column it equals up to sign."""
    C = (basis.T @ X.double()).abs()  # k × r
    best = C.argmax(dim=0)
    assert torch.allclose(C.max(dim=0).values, torch.ones(X.shape[1], dtype=torch.float64), atol=1e-5)
    return sorted(best.tolist())


def test_lora_ga_random_direction_is_seeded_disjoint_split():
    W, G = weight_matrix(M, N), grad_matrix(M, N)
    U, _, Vh = svd64(G)
    splits = set()
    for seed in range(8):
        res = ga(W, G, direction="random", scale="unit", seed=seed)
        again = ga(W, G, direction="random", scale="unit", seed=seed)
        assert torch.equal(res.A, again.A) and torch.equal(res.B, again.B)
        a_idx = _matched_pairs(res.A.T, Vh[: 2 * R].T)
        b_idx = _matched_pairs(res.B, U[:, : 2 * R])
        assert len(set(a_idx)) == R and len(set(b_idx)) == R
        assert set(a_idx).isdisjoint(b_idx) and set(a_idx) | set(b_idx) == set(range(2 * R))
        assert (a_idx, b_idx) == tuple(split_pairs("random", R, seed))
        splits.add(tuple(a_idx))
    assert len(splits) > 1, "the random split does not depend on the seed"


def _ga_expected_factor(scale, W, m, gamma=16.0):
    if scale == "stable":
        return m ** 0.25 / math.sqrt(gamma)
    if scale in ("gd_scale", "gd"):
        return 1 / S_LORA
    if scale == "unit":
        return 1.0
    S = svd64(W)[1]
    return float(torch.sqrt(S[:R] / S_LORA).mean())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scale", ["stable", "gd_scale", "unit", "weight_svd"])
def test_lora_ga_scale_factor_on_both_factors(scale, shape):
    m, n = shape
    W, G = weight_matrix(m, n), grad_matrix(m, n)
    res = ga(W, G, scale=scale)
    f = _ga_expected_factor(scale, W, m)
    # every row of A and every column of B has norm f (orthonormal singular vectors × f)
    torch.testing.assert_close(res.A.double().norm(dim=1), torch.full((R,), f, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.B.double().norm(dim=0), torch.full((R,), f, dtype=torch.float64), rtol=1e-5, atol=0)
    U, _, Vh = svd64(G)
    torch.testing.assert_close(res.A.double().T @ res.A.double(), f ** 2 * (Vh[:R].T @ Vh[:R]), atol=1e-5 * f ** 2,
                               rtol=0)
    torch.testing.assert_close(res.B.double() @ res.B.double().T, f ** 2 * (U[:, R:2 * R] @ U[:, R:2 * R].T),
                               atol=1e-5 * f ** 2, rtol=0)
    assert res.info["factor"] == pytest.approx(f, rel=1e-5)


def test_lora_ga_stable_gamma_option():
    W, G = weight_matrix(M, N), grad_matrix(M, N)
    res = ga(W, G, scale="stable", stable_gamma=4.0)
    f = M ** 0.25 / 2.0
    torch.testing.assert_close(res.A.norm(dim=1), torch.full((R,), f), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.B.norm(dim=0), torch.full((R,), f), rtol=1e-5, atol=0)


@pytest.mark.parametrize("alias,name", [("gd", "gd_scale"), ("weightS", "weight_svd"), ("UNIT", "unit")])
def test_lora_ga_authors_scale_aliases(alias, name):
    W, G = weight_matrix(M, N), grad_matrix(M, N)
    a, b = ga(W, G, scale=alias), ga(W, G, scale=name)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert a.info["scale"] == name


def _sgd_step_change(A0, B0, G, s, lr):
    """s·B₁A₁ − s·B₀A₀ after one SGD step on ⟨G, s·B·A⟩ (so ∂L/∂W_eff = G); gradients by autograd, fp64."""
    A = A0.double().clone().requires_grad_(True)
    B = B0.double().clone().requires_grad_(True)
    loss = (G.double() * (s * B @ A)).sum()
    gA, gB = torch.autograd.grad(loss, (A, B))
    torch.testing.assert_close(gA, s * B.detach().T @ G.double())  # ∇A = s·Bᵀ G
    torch.testing.assert_close(gB, s * G.double() @ A.detach().T)  # ∇B = s·G Aᵀ
    with torch.no_grad():
        A1, B1 = A - lr * gA, B - lr * gB
        return s * (B1 @ A1 - B @ A)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_lora_ga_first_sgd_step_follows_rank_2r_gradient(direction, shape):
    """The paper's point: with `unit` factors the first step changes s·B·A by −η s² [G]_{2r} (to first order)."""
    m, n = shape
    W, G = weight_matrix(m, n), grad_matrix(m, n)
    res = ga(W, G, direction=direction, scale="unit", seed=3)
    lr = 1e-7
    delta = _sgd_step_change(res.A, res.B, G, S_LORA, lr) / lr
    assert_rel_close(delta, -(S_LORA ** 2) * truncate(G, 2 * R), tol=1e-4)


@pytest.mark.parametrize("scale", ["stable", "gd_scale", "weight_svd"])
def test_lora_ga_first_sgd_step_scaled(scale):
    """Any scale f multiplies that first step by f²: −η s² f² (B̂B̂ᵀG + GÂᵀÂ) = −η s² f² [G]_{2r}."""
    W, G = weight_matrix(M, N), grad_matrix(M, N)
    res = ga(W, G, scale=scale)
    f = _ga_expected_factor(scale, W, M)
    lr = 1e-7
    delta = _sgd_step_change(res.A, res.B, G, S_LORA, lr) / lr
    B, A = res.B.double(), res.A.double()
    assert_rel_close(delta, -(S_LORA ** 2) * (B @ B.T @ G.double() + G.double() @ A.T @ A), tol=1e-4)
    assert_rel_close(delta, -(S_LORA ** 2) * f ** 2 * truncate(G, 2 * R), tol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# lora_one (SPEC §2, §2.3)
# ----------------------------------------------------------------------------------------------------------------------


def _one_factor(scale, W, gamma=128.0):
    if scale == "stable":
        return 1 / math.sqrt(gamma)
    return _ga_expected_factor(scale, W, None)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scale", ["stable", "unit", "gd_scale", "weight_svd"])
def test_lora_one_product_is_normalised_negative_truncated_gradient(scale, shape):
    m, n = shape
    W, G = weight_matrix(m, n), grad_matrix(m, n)
    res = init_factors("lora_one", W, LayerStats(grad=G), rank=R, scaling=S_LORA, scale=scale)
    f = _one_factor(scale, W)
    sigma1 = svd64(G)[1][0]
    assert_rel_close(product(res), -truncate(G, R) / sigma1 * f ** 2)
    # balanced: ‖A‖₂ = ‖B‖₂ = f
    assert float(torch.linalg.matrix_norm(res.A.double(), 2)) == pytest.approx(f, rel=1e-5)
    assert float(torch.linalg.matrix_norm(res.B.double(), 2)) == pytest.approx(f, rel=1e-5)
    assert res.subtract is False


def test_lora_one_stable_spectral_norm_is_s_over_gamma():
    W, G = weight_matrix(M, N), grad_matrix(M, N)
    for gamma in (128.0, 32.0):
        res = init_factors("lora_one", W, LayerStats(grad=G), rank=R, scaling=S_LORA, stable_gamma=gamma)
        norm = float(torch.linalg.matrix_norm(S_LORA * product(res), 2))
        assert norm == pytest.approx(S_LORA / gamma, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# lora_fa (SPEC §2.2)
# ----------------------------------------------------------------------------------------------------------------------


def clamped_roots(cov: torch.Tensor, reg: float, relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cov_λ^{1/2}, cov_λ^{-1/2} by eigh with eigenvalues clamped ≥ 1e-8 (× the largest in relative mode), fp64."""
    w, Q = torch.linalg.eigh(damped(cov, reg, relative))
    w = w.clamp_min(max(1e-8 * float(w.max()) if relative else 1e-8, 1e-8))
    return (Q * w.sqrt()) @ Q.T, (Q * w.rsqrt()) @ Q.T


def lora_fa_reference(st: LayerStats, r: int, reg: float, relative: bool) -> torch.Tensor:
    """M / σ₁(M), M = C_λ^{-1/2} [−C_λ^{1/2} Ḡ Σ_λ^{1/2}]_r Σ_λ^{-1/2}, independently in fp64 (SPEC §2.2)."""
    c_root, c_inv_root = clamped_roots(st.out_cov, reg, relative)
    s_root, s_inv_root = clamped_roots(st.in_cov, reg, relative)
    H = c_root @ st.cross.double() @ s_root
    Mx = c_inv_root @ truncate(-H, r) @ s_inv_root
    return Mx / torch.linalg.matrix_norm(Mx, 2)


def fa(W, st, **kw):
    kw.setdefault("rank", R)
    kw.setdefault("scaling", S_LORA)
    return init_factors("lora_fa", W, st, **kw)


@pytest.mark.parametrize("n_tokens,n_batches", [(7, 7), (100, 3)])
@pytest.mark.parametrize("scale", ["stable", "unit"])
def test_lora_fa_with_identity_covariances_is_lora_one(scale, n_tokens, n_batches):
    """C = Σ = I and no damping: the functional metric is Frobenius, so M = [−Ḡ]_r; σ₁-normalisation removes the
    scale of Ḡ = G·n_batches/n_tokens."""
    W, G = weight_matrix(M, N), grad_matrix(M, N)
    st = LayerStats(grad=G, in_cov=torch.eye(N), out_cov=torch.eye(M), n_tokens=n_tokens, n_batches=n_batches)
    res = fa(W, st, reg=0.0, reg_mode="absolute", scale=scale)
    one = init_factors("lora_one", W, LayerStats(grad=G), rank=R, scaling=S_LORA, scale=scale)
    assert_rel_close(product(res), product(one), tol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("reg_mode,reg", [("relative", 1e-3), ("absolute", 1e-3), ("relative", 1e-6)])
def test_lora_fa_matches_whitened_reference(reg_mode, reg, shape):
    m, n = shape
    W, st = weight_matrix(m, n), full_stats(m, n)
    res = fa(W, st, reg=reg, reg_mode=reg_mode, scale="stable")
    ref = lora_fa_reference(st, R, reg, reg_mode == "relative")
    assert_rel_close(product(res), ref / 128.0, tol=2e-4)
    # not simply LoRA-One: the covariances change the product
    one = init_factors("lora_one", W, st, rank=R, scaling=S_LORA)
    assert torch.linalg.norm(product(res) - product(one)) > 0.05 * torch.linalg.norm(product(one))


@pytest.mark.parametrize("reg_mode,reg", [("absolute", 0.0), ("relative", 0.0), ("absolute", 1e-12)])
def test_lora_fa_singular_covariances_without_damping(reg_mode, reg):
    """Fewer tokens than features (C = JᵀJ/N of rank N < m, Σ of rank < n) and (almost) no damping: the eigenvalue
    floor keeps the roots finite and M is still SPEC §2.2's. The tolerance allows fp32 roots (cond(C_λ^{1/2}) ~ 1e4)."""
    W, st = weight_matrix(M, N), full_stats(M, N)
    J = torch.randn(10, M, generator=_gen(3), dtype=torch.float64)
    X = torch.randn(12, N, generator=_gen(4), dtype=torch.float64)
    sing = LayerStats(grad=st.grad, in_cov=(X.T @ X / 12).float(), out_cov=(J.T @ J / 10).float(),
                      n_tokens=st.n_tokens, n_batches=st.n_batches)
    res = fa(W, sing, reg=reg, reg_mode=reg_mode, scale="unit")
    assert torch.isfinite(res.A).all() and torch.isfinite(res.B).all()
    assert_rel_close(product(res), lora_fa_reference(sing, R, reg, reg_mode == "relative"), tol=5e-3)


def test_lora_fa_default_options():
    """Defaults per SPEC §2.2/§2.3: reg = 1e-6, relative damping, stable with γ = 128."""
    W, st = weight_matrix(M, N), full_stats(M, N)
    res = fa(W, st)
    assert_rel_close(product(res), lora_fa_reference(st, R, 1e-6, True) / 128.0, tol=2e-4)
    assert res.info["reg_mode"] == "relative"


def _objective(dW, G, Cl, Sl):
    """‖C_λ^{1/2} (ΔW + Ḡ) Σ_λ^{1/2}‖_F."""
    return float(torch.linalg.norm(sqrtm(Cl) @ (dW + G) @ sqrtm(Sl)))


def _best_multiple(X, G, Cl, Sl):
    """c·X with the scalar c minimising the objective (closed form, it is a 1-D least squares)."""
    cr, sr = sqrtm(Cl), sqrtm(Sl)
    x, y = cr @ X @ sr, cr @ G @ sr
    return -(x * y).sum() / (x * x).sum() * X


def test_lora_fa_is_optimal_in_the_functional_metric():
    W, st = weight_matrix(M, N), full_stats(M, N)
    reg = 1e-3
    res = fa(W, st, reg=reg, reg_mode="relative", scale="unit")
    G = st.cross.double()
    Cl, Sl = damped(st.out_cov, reg, True), damped(st.in_cov, reg, True)
    Mx = _best_multiple(product(res), G, Cl, Sl)  # recovers the unnormalised M
    best = _objective(Mx, G, Cl, Sl)
    # Eckart–Young in the whitened coordinates: the minimum over rank-r ΔW is √(Σ_{i>r} σ_i(H̃)²)
    sig = svd64(sqrtm(Cl) @ G @ sqrtm(Sl))[1]
    assert best == pytest.approx(float(sig[R:].pow(2).sum().sqrt()), rel=1e-4)
    # strictly better than LoRA-One's direction, even optimally rescaled
    one = init_factors("lora_one", W, st, rank=R, scaling=S_LORA, scale="unit")
    assert best < 0.99 * _objective(_best_multiple(product(one), G, Cl, Sl), G, Cl, Sl)
    # and no rank-r perturbation of the factors does better
    g = _gen(11)
    B0, A0 = Mx @ res.A.double().T @ torch.linalg.inv(res.A.double() @ res.A.double().T), res.A.double()
    for _ in range(20):
        eps = 1e-2
        B1 = B0 + eps * B0.norm() / math.sqrt(B0.numel()) * torch.randn(B0.shape, generator=g, dtype=torch.float64)
        A1 = A0 + eps * A0.norm() / math.sqrt(A0.numel()) * torch.randn(A0.shape, generator=g, dtype=torch.float64)
        assert _objective(B1 @ A1, G, Cl, Sl) >= best * (1 - 1e-9)


def test_lora_fa_relative_damping_is_scale_invariant():
    W, st = weight_matrix(M, N), full_stats(M, N)
    base = fa(W, st, reg=1e-3, reg_mode="relative")
    scaled = LayerStats(grad=st.grad, in_cov=st.in_cov * 1e3, out_cov=st.out_cov * 1e-8,
                        n_tokens=st.n_tokens, n_batches=st.n_batches)
    assert_rel_close(product(fa(W, scaled, reg=1e-3, reg_mode="relative")), product(base), tol=2e-4)


def test_lora_fa_absolute_damping_swamps_a_tiny_output_covariance():
    W, st = weight_matrix(M, N), full_stats(M, N)
    tiny = LayerStats(grad=st.grad, in_cov=st.in_cov, out_cov=st.out_cov * 1e-8,
                      n_tokens=st.n_tokens, n_batches=st.n_batches)
    rel = product(fa(W, tiny, reg=1e-6, reg_mode="relative"))
    ab = product(fa(W, tiny, reg=1e-6, reg_mode="absolute"))
    assert torch.linalg.norm(rel - ab) > 0.05 * torch.linalg.norm(rel)
    # absolute: C_λ ≈ 1e-6·I, so C drops out and only Σ is used
    no_c = LayerStats(grad=st.grad, in_cov=st.in_cov, out_cov=torch.eye(M), n_tokens=st.n_tokens,
                      n_batches=st.n_batches)
    assert_rel_close(ab, lora_fa_reference(no_c, R, 0.0, False) / 128.0, tol=5e-2)
    # relative: the tiny C is still fully used (same as at normal scale)
    assert_rel_close(rel, product(fa(W, st, reg=1e-6, reg_mode="relative")), tol=2e-4)
    # at normal scale with a tiny λ the two modes agree
    assert_rel_close(product(fa(W, st, reg=1e-9, reg_mode="absolute")),
                     product(fa(W, st, reg=1e-9, reg_mode="relative")), tol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# SVD backends (SPEC §2.4)
# ----------------------------------------------------------------------------------------------------------------------


def _decaying(m=120, n=80, seed=4):
    return with_spectrum(m, n, 0.8 ** torch.arange(min(m, n), dtype=torch.float64), seed).float()


@pytest.mark.parametrize("k", [1, 5])
def test_randomized_svd_finds_top_subspace_and_is_seeded(k):
    X = _decaying()
    U0, S0, Vh0 = svd64(X)
    backends = (lambda seed: randomized_svd(X, k, seed=seed),
                lambda seed: top_svd(X, k, svd="randomized", seed=seed)[:3])
    for fn in backends:
        U, S, Vh = fn(7)
        assert U.shape == (120, k) and S.shape == (k,) and Vh.shape == (k, 80)
        cos_u = torch.linalg.svdvals(U0[:, :k].T @ U.double())
        cos_v = torch.linalg.svdvals(Vh0[:k] @ Vh.double().T)
        assert cos_u.min() > 0.99 and cos_v.min() > 0.99
        torch.testing.assert_close(S.double(), S0[:k], rtol=1e-3, atol=0)
        U2, S2, Vh2 = fn(7)
        assert torch.equal(U, U2) and torch.equal(S, S2) and torch.equal(Vh, Vh2)
    assert top_svd(X, k, svd="randomized", seed=0)[3] == "randomized"


def test_svd_mode_is_recorded(monkeypatch):
    W, st = weight_matrix(M, N), full_stats(M, N)
    assert init_factors("pissa", W, rank=R, scaling=S_LORA).info["svd"] == "exact"  # auto, small matrix
    assert init_factors("lora_ga", W, st, rank=R, scaling=S_LORA, svd="auto").info["svd"] == "exact"
    rnd = init_factors("pissa", W, rank=R, scaling=S_LORA, svd="randomized", seed=1)
    assert rnd.info["svd"] == "randomized"
    assert_rel_close(S_LORA * product(rnd), truncate(W, R), tol=1e-3)
    # auto picks the randomized SVD once min(m, n) exceeds the exact-SVD limit (lowered here to keep the test small),
    # unless the range finder would need (nearly) the whole matrix anyway
    monkeypatch.setattr("lorafa.methods.common.EXACT_SVD_MAX_DIM", 32)
    X = _decaying()
    assert top_svd(X, 2, svd="auto")[3] == "randomized"
    assert top_svd(X, 40, svd="auto")[3] == "exact"
    assert top_svd(X[:, :30], 2, svd="auto")[3] == "exact"
    assert top_svd(X, 2, svd="exact")[3] == "exact"
    assert init_factors("pissa", X, rank=2, scaling=S_LORA).info["svd"] == "randomized"


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=r"Unknown init method 'dora'.*known.*lora_fa.*LoRA-One"):
        init_factors("dora", weight_matrix(M, N), rank=R, scaling=S_LORA)


def test_option_the_method_lacks():
    with pytest.raises(ValueError, match=r"pissa has no option\(s\) \['direction'\]; its options are none"):
        init_factors("pissa", weight_matrix(M, N), rank=2, scaling=1, direction="ArB2r")
    with pytest.raises(ValueError, match=r"lora_one has no option\(s\) \['reg'\].*scale"):
        init_factors("lora_one", weight_matrix(M, N), full_stats(M, N), rank=2, scaling=1, reg=0.1)


@pytest.mark.parametrize("method", ["lora", "pissa", "milora", "lora_one", "lora_fa", "corda", "eva"])
@pytest.mark.parametrize("rank", [0, min(M, N) + 1])
def test_invalid_rank(method, rank):
    with pytest.raises(ValueError, match=rf"rank {rank} is invalid for a {M}×{N} weight.*r ≤ {min(M, N)}"):
        init_factors(method, weight_matrix(M, N), full_stats(M, N), rank=rank, scaling=S_LORA)


def test_lora_ga_needs_2r_pairs():
    W, st = weight_matrix(M, N), full_stats(M, N)
    init_factors("lora_ga", W, st, rank=N // 2, scaling=S_LORA)  # 2r = min(m, n) is fine
    with pytest.raises(ValueError, match=r"rank 9 is invalid.*lora_ga takes 2r singular pairs.*r ≤ 8"):
        init_factors("lora_ga", W, st, rank=N // 2 + 1, scaling=S_LORA)


@pytest.mark.parametrize("method,kind,stats", [
    ("lora_ga", "grad", None),
    ("lora_one", "grad", LayerStats(in_cov=torch.eye(N))),
    ("lora_fa", "kfac", LayerStats(grad=torch.ones(M, N), in_cov=torch.eye(N), n_tokens=4, n_batches=1)),
    ("corda", "act", LayerStats(grad=torch.ones(M, N))),
    # kfac without a token count cannot give Ḡ = G·n_batches/n_tokens
    ("lora_fa", "kfac", LayerStats(grad=torch.ones(M, N), in_cov=torch.eye(N), out_cov=torch.eye(M))),
    ("eva", "act", None),
])
def test_missing_stats(method, kind, stats):
    with pytest.raises(ValueError, match=rf"{method} needs '{kind}' statistics for 'layers\.0\.q'.*missing"):
        init_factors(method, weight_matrix(M, N), stats, rank=R, scaling=S_LORA, name="layers.0.q")


@pytest.mark.parametrize("field,bad", [("grad", (N, M)), ("in_cov", (M, M)), ("out_cov", (N, N))])
def test_stats_with_wrong_shapes(field, bad):
    st = full_stats(M, N)
    setattr(st, field, torch.zeros(bad))
    with pytest.raises(ValueError, match=rf"{field} statistics for 'layers\.0\.q' have shape \({bad[0]}, {bad[1]}\)"):
        init_factors("lora_fa", weight_matrix(M, N), st, rank=R, scaling=S_LORA, name="layers.0.q")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method,field", [("lora_ga", "grad"), ("corda", "in_cov"), ("lora_fa", "out_cov")])
def test_non_finite_stats_name_the_module(method, field, bad):
    st = full_stats(M, N)
    t = getattr(st, field).clone()
    t[1, 2] = bad
    setattr(st, field, t)
    with pytest.raises(ValueError, match=rf"{field} statistics for {re.escape(repr('layers.0.q'))} contain NaN/inf"):
        init_factors(method, weight_matrix(M, N), st, rank=R, scaling=S_LORA, name="layers.0.q")


@pytest.mark.parametrize("weight", [torch.ones(M, N, dtype=torch.int64), torch.ones(N), "not a tensor"],
                         ids=["int", "1d", "str"])
def test_non_floating_weight(weight):
    with pytest.raises(TypeError, match=r"weight for 'layers\.0\.q' must be a 2-D floating tensor"):
        init_factors("pissa", weight, rank=R, scaling=S_LORA, name="layers.0.q")


@pytest.mark.parametrize("method,options,pattern", [
    ("lora_ga", {"direction": "ArB3r"}, r"Unknown lora_ga direction 'ArB3r'; choose from .*ArB2r"),
    ("lora_ga", {"scale": "huge"}, r"Unknown scale 'huge'; choose from .*stable"),
    ("lora_one", {"scale": "huge"}, r"Unknown scale 'huge'"),
    ("lora_fa", {"scale": "huge"}, r"Unknown scale 'huge'"),
    ("lora_fa", {"reg_mode": "rel"}, r"reg_mode must be 'relative' or 'absolute'"),
    ("lora_fa", {"reg": -1.0}, r"reg must be >= 0"),
    ("corda", {"corda_method": "xpm"}, r"corda_method must be 'ipm' or 'kpm'"),
    ("corda", {"reg": 0.0}, r"corda's reg \(InitConfig's corda_reg\) must be > 0"),
    ("lora_ga", {"stable_gamma": 0.0}, r"stable_gamma must be > 0"),
    ("lora_one", {"stable_gamma": 0.0}, r"stable_gamma must be > 0"),
    ("lora_fa", {"stable_gamma": -1.0}, r"stable_gamma must be > 0"),
])
def test_invalid_options(method, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        init_factors(method, weight_matrix(M, N), full_stats(M, N), rank=R, scaling=S_LORA, **options)


def test_smallest_pairs_need_exact_svd():
    W, st = weight_matrix(M, N), full_stats(M, N)
    with pytest.raises(ValueError, match=r"milora needs the smallest singular pairs.*svd='exact'"):
        init_factors("milora", W, rank=R, scaling=S_LORA, svd="randomized")
    with pytest.raises(ValueError, match=r"corda kpm needs the smallest singular pairs"):
        init_factors("corda", W, st, rank=R, scaling=S_LORA, svd="randomized", corda_method="kpm")


def test_bad_scaling_and_svd_mode():
    W = weight_matrix(M, N)
    with pytest.raises(ValueError, match=r"scaling must be > 0"):
        init_factors("pissa", W, rank=R, scaling=0.0)
    with pytest.raises(ValueError, match=r"svd must be 'auto', 'exact' or 'randomized', got 'fast'"):
        init_factors("pissa", W, rank=R, scaling=S_LORA, svd="fast")


def test_zero_gradient_is_a_clear_error():
    with pytest.raises(ValueError, match=r"σ₁ = 0"):
        init_factors("lora_one", weight_matrix(M, N), LayerStats(grad=torch.zeros(M, N)), rank=R, scaling=S_LORA)


# ----------------------------------------------------------------------------------------------------------------------
# method-name resolution
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    ("LoRA-FA", ("lora_fa", None)),
    ("lora-fa", ("lora_fa", None)),
    ("lora-one", ("lora_one", None)),
    ("LoRA-One", ("lora_one", None)),
    ("LoRA-GA", ("lora_ga", None)),
    ("LORA_GA", ("lora_ga", None)),
    (" PiSSA ", ("pissa", None)),
    ("arb2r", ("lora_ga", "ArB2r")),
    ("ArB2r", ("lora_ga", "ArB2r")),
    ("A2RBR", ("lora_ga", "A2rBr")),
    ("arbr", ("lora_ga", "ArBr")),
    ("Random", ("lora_ga", "random")),
])
def test_resolve_method(name, expected):
    assert resolve_method(name) == expected
    assert lorafa.resolve_method is resolve_method


def test_resolve_unknown_method():
    with pytest.raises(ValueError, match=r"Unknown init method 'lora-xx'; known: .*'eva'.*'LoRA-FA'.*'ArB2r'"):
        resolve_method("lora-xx")


def test_every_registered_method_resolves_to_itself():
    for name in METHODS:
        assert resolve_method(name) == (name, None)
        assert resolve_method(name.upper().replace("_", "-")) == (name, None)


# ----------------------------------------------------------------------------------------------------------------------
# svd="auto" and slowly decaying spectra (issue 8.7; benchmarks/svd_accuracy.py)
# ----------------------------------------------------------------------------------------------------------------------


def _flat_spectrum(k: int, r: int = R) -> torch.Tensor:
    """r leading values separated from a slowly decaying tail: the top-r subspace is well defined (σ_r/σ_{r+1} ≈ 1.07)
    but σ_q/σ_r ≈ 0.9 at q = 2r + 10, so 4 power iterations leave the range finder far from it."""
    return torch.cat([torch.linspace(1.0, 0.96, r, dtype=torch.float64),
                      torch.linspace(0.9, 0.6, k - r, dtype=torch.float64)])


def _sin_theta(X: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest principal-angle sine between span(X) and span(ref) (fp64)."""
    return float(torch.linalg.matrix_norm(projector(X) - projector(ref), 2))


def test_auto_svd_iterates_or_goes_exact_where_the_range_finder_is_inaccurate():
    """`auto` above 128 dimensions: 4 power iterations where they suffice (steep spectrum), more where the Ritz values
    say up to 16 will do (moderate decay), the exact SVD where not even 16 would (flat tail)."""
    from lorafa.methods.common import EXACT_SVD_MAX_DIM, MAX_NITER, RANDOMIZED_NITER, iterations_needed

    m, n, k = 300, 200, 4
    assert min(m, n) > EXACT_SVD_MAX_DIM
    idx = torch.arange(n, dtype=torch.float64)
    cases = {"steep": (0.8 ** idx, "randomized", False), "moderate": (0.97 ** idx, "randomized", True),
             "flat": (_flat_spectrum(n, k), "exact", True)}
    for seed, (name, (svals, expect, plain_misses)) in enumerate(cases.items()):
        X = with_spectrum(m, n, svals, seed=11 + seed).float()
        U0, _, Vh0 = svd64(X)
        U, S, Vh, used = top_svd(X, k, svd="auto", seed=3)
        assert used == expect, name
        assert max(_sin_theta(U, U0[:, :k]), _sin_theta(Vh.T, Vh0[:k].T)) < 1e-4, name
        # svd="randomized" is honoured: RANDOMIZED_NITER iterations, whatever the accuracy
        U, S, Vh, used = top_svd(X, k, svd="randomized", seed=3)
        assert used == "randomized"
        assert (_sin_theta(U, U0[:, :k]) > 1e-3) == plain_misses, name
        need = iterations_needed(randomized_svd(X, 2 * k + 10, seed=3)[1], k)  # all q Ritz values
        assert (need <= RANDOMIZED_NITER, need <= MAX_NITER) == {"steep": (True, True), "moderate": (False, True),
                                                                 "flat": (False, False)}[name]


def test_range_finder_error_and_iterations_needed():
    from lorafa.methods.common import RANDOMIZED_TOL, iterations_needed, range_finder_error

    S = torch.tensor([1.0, 0.9, 0.5])
    assert range_finder_error(S, 2) == pytest.approx((0.5 / 0.9) ** 9)
    p = iterations_needed(S, 2, tol=1e-6)
    assert range_finder_error(S, 2, niter=p) <= 1e-6 < range_finder_error(S, 2, niter=p - 1)
    assert iterations_needed(torch.tensor([1.0, 0.0]), 1) == 0  # rank k: nothing beyond it to converge against
    assert range_finder_error(torch.zeros(20), 4) == math.inf > RANDOMIZED_TOL
    assert iterations_needed(torch.ones(20), 4) == math.inf  # no decay at all
    assert top_svd(torch.zeros(300, 200), 4, svd="auto")[3] == "exact"  # a zero matrix: no Ritz ratio


def test_lora_fa_auto_svd_on_a_flat_whitened_spectrum():
    """H̃ = F_Cᵀ Ḡ F_Σ with a slowly decaying spectrum and min(m, n) > 128: `auto` gives the exact SVD's adapter
    (and says so); the range finder, still available as svd="randomized", misses the top-r subspace."""
    m, n, reg = 200, 160, 1e-6
    in_cov, out_cov = spd(n, 21), spd(m, 22)
    H = with_spectrum(m, n, _flat_spectrum(n), seed=23)
    cross = sqrtm(damped(out_cov, reg, True), -0.5) @ H @ sqrtm(damped(in_cov, reg, True), -0.5)
    n_tokens, n_batches = 64, 4
    st = LayerStats(grad=(cross * n_tokens / n_batches).float(), in_cov=in_cov, out_cov=out_cov,
                    n_tokens=n_tokens, n_batches=n_batches)
    W = weight_matrix(m, n)
    auto, exact, rnd = (fa(W, st, svd=mode, seed=5) for mode in ("auto", "exact", "randomized"))
    assert (auto.info["svd"], exact.info["svd"], rnd.info["svd"]) == ("exact", "exact", "randomized")
    assert_rel_close(product(auto), product(exact), tol=1e-6)
    ref = lora_fa_reference(st, R, reg, True) / 128.0
    assert_rel_close(product(auto), ref, tol=1e-4)
    U_ref = svd64(ref)[0][:, :R]
    assert _sin_theta(auto.B, U_ref) < 1e-4
    assert _sin_theta(rnd.B, U_ref) > 1e-2
