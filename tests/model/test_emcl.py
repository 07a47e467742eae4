"""EMCL: the published recipe step by step, rank of the correction, state, gradients, groups."""
from __future__ import annotations

import math

import pytest
import torch

from emcl_nb.model.emcl import EMCL, effective_rank, reference_basis_init


def recipe(x: torch.Tensor, m: torch.Tensor, stages: int, lamd: float, beta: float):
    """docs/method.md §4 written out with explicit loops over channels and bases."""
    N, D = x.shape
    K = m.shape[1]
    mu = m.repeat(N, 1)                                        # [N, K]
    for _ in range(stages):
        z = torch.empty(D, K)
        for d in range(D):
            z[d] = torch.softmax(torch.stack([x[:, d] @ mu[:, k] for k in range(K)]) / lamd, dim=0)
        for k in range(K):
            z[:, k] = z[:, k] / (1e-6 + z[:, k].sum())
        mu = torch.stack([x @ z[:, k] for k in range(K)], dim=1)
        for k in range(K):
            mu[:, k] = mu[:, k] / (1e-6 + mu[:, k].norm())
    recon = mu @ z.t()
    return beta * recon + x, z, mu


@pytest.fixture
def small_x():
    return torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-2.0, 1.0, 0.0], [0.0, 0.75, 1.0]])


def test_initial_values_are_plus_minus_one():
    m = reference_basis_init(16, torch.Generator().manual_seed(0))
    assert m.shape == (1, 16)
    assert torch.allclose(m.abs(), torch.ones_like(m), atol=1e-4)
    assert (m > 0).any() and (m < 0).any()


def test_matches_recipe_step_by_step(small_x):
    torch.manual_seed(0)
    emcl = EMCL(num_bases=2, stage_num=4, momentum=0.9, lamd=0.5, beta=3.0).train()
    m0 = emcl.basis_init.clone()
    out = emcl(small_x)
    want, z, mu = recipe(small_x, m0, stages=4, lamd=0.5, beta=3.0)
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.allclose(emcl.last.z, z, atol=1e-6) and torch.allclose(emcl.last.mu, mu, atol=1e-6)
    assert not torch.allclose(out, small_x)                    # the correction is not zero
    # momentum update of the initial values in training mode
    assert torch.allclose(emcl.basis_init, 0.9 * m0 + 0.1 * mu.mean(dim=0, keepdim=True), atol=1e-7)


def test_momentum_update_only_in_training(small_x):
    emcl = EMCL(num_bases=2, stage_num=3).eval()
    m0 = emcl.basis_init.clone()
    emcl(small_x)
    assert torch.equal(emcl.basis_init, m0)
    emcl.train()(small_x.unsqueeze(0))                         # grouped calls never update
    assert torch.equal(emcl.basis_init, m0)
    emcl(small_x)
    assert not torch.equal(emcl.basis_init, m0)


def test_no_gradient_through_reconstruction(small_x):
    for init in ("reference", "distinct"):
        x = small_x.clone().requires_grad_(True)
        EMCL(num_bases=2, stage_num=3, init=init, dim=3)(x).sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))


def rank_input(seed: int = 0):
    """N=40 rows, D=16 channels with a common component (like CLIP embeddings)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 16, generator=g) + 2.0 * torch.randn(1, 16, generator=g)


def test_reference_correction_has_rank_at_most_two_and_distinct_more():
    x = rank_input()
    torch.manual_seed(0)
    reference = EMCL(num_bases=8, stage_num=9).eval()
    reference(x)
    assert effective_rank(reference.last.recon) <= 2
    distinct = EMCL(num_bases=8, stage_num=9, init="distinct", dim=16).eval()
    distinct(x)
    assert effective_rank(distinct.last.recon) > 2
    # beta only scales R: the correction X' - X has the rank of R
    assert effective_rank(distinct(x) - x) == effective_rank(distinct.last.recon)


def test_exact_plus_minus_one_bases_give_rank_two_on_any_input():
    """The structural reason: bases that start equal stay equal, so at most two distinct
    bases exist. (The drawn values are ±(1 - 1e-6/|m|), not exactly ±1; on some inputs the
    EM amplifies that tiny difference, which is why the test above fixes its input.)"""
    emcl = EMCL(num_bases=8, stage_num=9).eval()
    emcl.basis_init.copy_(torch.tensor([[1.0, -1, 1, 1, -1, 1, -1, -1]]))
    for seed in range(3):
        emcl(torch.randn(40, 16, generator=torch.Generator().manual_seed(seed)))
        assert effective_rank(emcl.last.recon, tol=1e-5) <= 2


def test_effective_rank_counts_singular_values():
    a = torch.randn(10, 3) @ torch.randn(3, 8)
    assert effective_rank(a) == 3
    assert effective_rank(torch.zeros(4, 4)) == 0
    assert effective_rank(torch.stack([a, a[:, :1].repeat(1, 8)])).tolist() == [3, 1]


@pytest.mark.parametrize("init", ["reference", "distinct"])
def test_buffer_round_trips_through_state_dict(init):
    torch.manual_seed(0)
    trained = EMCL(num_bases=4, stage_num=3, init=init, dim=16).train()
    for seed in range(3):
        trained(rank_input(seed))                              # move the kept state
    torch.manual_seed(1)
    fresh = EMCL(num_bases=4, stage_num=3, init=init, dim=16)
    assert set(trained.state_dict()) == {"basis_init" if init == "reference" else "basis_directions"}
    x = rank_input(7)
    assert not torch.allclose(fresh.eval()(x), trained.eval()(x))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(x), trained(x))


def test_distinct_directions_update_in_training():
    torch.manual_seed(0)
    emcl = EMCL(num_bases=8, stage_num=9, init="distinct", dim=16).train()
    p0 = emcl.basis_directions.clone()
    emcl(rank_input())
    assert not torch.allclose(emcl.basis_directions, p0)
    assert torch.allclose(emcl.basis_directions.norm(dim=0), torch.ones(8), atol=1e-5)


@pytest.mark.parametrize("init", ["reference", "distinct"])
def test_grouped_input_equals_per_block_calls(init):
    torch.manual_seed(0)
    emcl = EMCL(num_bases=4, stage_num=5, init=init, dim=16).eval()
    blocks = torch.stack([rank_input(s)[:12] for s in range(3)])    # [G=3, N=12, D=16]
    grouped = emcl(blocks)
    grouped_z = emcl.last.z
    for g in range(3):
        assert torch.allclose(grouped[g], emcl(blocks[g]), atol=1e-5)
        assert torch.allclose(grouped_z[g], emcl.last.z, atol=1e-5)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="dim"):
        EMCL(num_bases=4, init="distinct")
    with pytest.raises(ValueError, match="emcl_init"):
        EMCL(num_bases=4, init="orthogonal")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        EMCL(num_bases=4)(torch.randn(5))


def test_runs_in_fp32_under_autocast():
    emcl = EMCL(num_bases=4, stage_num=3).eval()
    x = rank_input()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = emcl(x.bfloat16())
    assert emcl.last.recon.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert math.isfinite(out.float().sum().item())
