"""The EMCL module (docs/method.md §4): an EM step over the feature channels of a stacked batch.

X [N,D] holds the rows of one block (pooled videos, then texts). The D channels are the
data points and the K bases live in sample space R^N. With no gradient, `stage_num` EM
iterations give responsibilities Z [D,K] and bases mu [N,K]; the reconstruction
R = mu Zᵀ [N,D] is added as a constant: X' = X + beta * R.

init="reference" is the published recipe: every basis starts as the constant vector m_k
with m_k = ±1, so at most two distinct bases exist and R has rank <= 2 (rank 1 in
practice). init="distinct" starts basis k at X p_k for K fixed distinct directions p_k
in channel space, so the bases stay distinct (used by the ablation notebook).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

EPS = 1e-6   # the reference's epsilon in every normalisation
INITS = ("reference", "distinct")


@dataclass
class EMState:
    """Detached results of the latest EMCL call (leading group dim kept when given)."""
    z: torch.Tensor      # [..., D, K] responsibilities (each column sums to 1)
    mu: torch.Tensor     # [..., N, K] bases (unit columns)
    recon: torch.Tensor  # [..., N, D] reconstruction R = mu Zᵀ (before the beta factor)


def normalize_columns(a: torch.Tensor) -> torch.Tensor:
    """Divide each column by (1e-6 + its L2 norm), as the reference does."""
    return a / (EPS + a.norm(dim=-2, keepdim=True))


def reference_basis_init(num_bases: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference's initial values m [1,K]: one draw of N(0, sqrt(2/K)) (the same call
    as the reference, so a generator seeded with s gives its values after seeding with s),
    divided entrywise by (1e-6 + |entry|) (the reference normalises over a singleton axis),
    i.e. ±1."""
    m = torch.empty(1, num_bases).normal_(0.0, math.sqrt(2.0 / num_bases), generator=generator)
    return m / (EPS + m.norm(dim=0, keepdim=True))   # [1, K]


def random_directions(dim: int, num_bases: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K distinct unit directions in channel space [D,K] (orthonormal when K <= D)."""
    a = torch.randn(dim, num_bases, generator=generator)   # [D, K]
    if num_bases <= dim:
        return torch.linalg.qr(a).Q
    return normalize_columns(a)


class EMCL(nn.Module):
    """EM over feature channels; `forward(x)` for x [N,D] or [G,N,D] (G independent blocks).

    In training mode a 2-D call updates the kept bases by momentum (reference: the initial
    values m; distinct: the directions P). Grouped [G,N,D] calls are for batched evaluation
    and never update them. Buffers (`basis_init` [1,K] or `basis_directions` [D,K]) are
    saved with the model's state_dict.
    """

    def __init__(self, num_bases: int, stage_num: int = 9, momentum: float = 0.9,
                 lamd: float = 1.0, beta: float = 3.0, init: str = "reference",
                 dim: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"EMCL init must be one of {', '.join(INITS)} (emcl_init); got {init!r}")
        if num_bases < 1 or stage_num < 1:
            raise ValueError(f"EMCL needs num_bases >= 1 and stage_num >= 1 (emcl_bases, "
                             f"emcl_stages); got {num_bases}, {stage_num}")
        if init == "distinct" and (dim is None or dim < 1):
            raise ValueError("EMCL init='distinct' needs dim = the feature width D")
        self.num_bases, self.stage_num, self.momentum = num_bases, stage_num, momentum
        self.lamd, self.beta, self.init = lamd, beta, init
        if init == "reference":
            self.register_buffer("basis_init", reference_basis_init(num_bases, generator))
        else:
            self.register_buffer("basis_directions", random_directions(dim, num_bases, generator))
        self.last: EMState | None = None
        self.last_training: EMState | None = None   # the latest call in training mode

    def extra_repr(self) -> str:
        return (f"num_bases={self.num_bases}, stage_num={self.stage_num}, momentum={self.momentum}, "
                f"lamd={self.lamd}, beta={self.beta}, init={self.init!r}")

    def initial_bases(self, x: torch.Tensor) -> torch.Tensor:
        """mu before the first iteration [...,N,K]."""
        if self.init == "reference":
            return self.basis_init.expand(*x.shape[:-1], self.num_bases)   # basis k = constant m_k
        return normalize_columns(x @ self.basis_directions)              # [..., N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3):
            raise ValueError(f"EMCL input must be [N, D] or [G, N, D]; got {tuple(x.shape)}")
        if self.init == "distinct" and x.shape[-1] != self.basis_directions.shape[0]:
            raise ValueError(f"EMCL(init='distinct') was built for D={self.basis_directions.shape[0]}; "
                             f"got input {tuple(x.shape)}")
        # The EM runs in fp32 even under autocast: its 1e-6 normalisations are meant for fp32.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            data = x.detach().float()                                     # [..., N, D]
            mu = self.initial_bases(data)                                 # [..., N, K]
            for _ in range(self.stage_num):
                z = torch.softmax(data.transpose(-1, -2) @ mu / self.lamd, dim=-1)  # [..., D, K]
                z = z / (EPS + z.sum(dim=-2, keepdim=True))               # columns sum to 1
                mu = normalize_columns(data @ z)                          # [..., N, K]
            recon = mu @ z.transpose(-1, -2)                              # [..., N, D]
            if self.training and x.dim() == 2:
                self._update_bases(mu, z)
        self.last = EMState(z=z, mu=mu, recon=recon)
        if self.training:
            self.last_training = self.last
        return self.beta * recon.to(x.dtype) + x

    def _update_bases(self, mu: torch.Tensor, z: torch.Tensor) -> None:
        """Momentum update of the kept state from this call's final EM result."""
        a = self.momentum
        if self.init == "reference":
            self.basis_init.copy_(a * self.basis_init + (1 - a) * mu.mean(dim=0, keepdim=True))
        else:
            self.basis_directions.copy_(normalize_columns(
                a * self.basis_directions + (1 - a) * normalize_columns(z)))


def seeded_emcl(seed: int, *, num_bases: int, stage_num: int, momentum: float, lamd: float,
                beta: float, init: str, dim: int) -> EMCL:
    """A new EMCL module (eval mode) whose initial bases depend on `seed` alone, not on
    the global RNG: the same seed gives the same bases in any process."""
    return EMCL(num_bases, stage_num, momentum, lamd, beta, init=init, dim=dim,
                generator=torch.Generator().manual_seed(seed)).eval()


def effective_rank(matrix: torch.Tensor, tol: float = 1e-2) -> torch.Tensor:
    """Number of singular values above tol * the largest one (per matrix for [...,M,N]).

    The default counts directions that carry at least 1 % of the largest one; smaller ones
    are treated as numerical residue (the reference's near-±1 initial values leave some).
    """
    s = torch.linalg.svdvals(matrix.detach().double())                   # [..., min(M, N)]
    return (s > tol * s.amax(dim=-1, keepdim=True).clamp_min(1e-300)).sum(dim=-1)
