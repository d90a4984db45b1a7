"""The policy-gradient task on a real pretrained matrix (Gate II lives here).

A softmax policy over ``V`` outputs whose logits are ``W h`` (``W``: ``V x d``, by default
256 rows of MiniLM's word embeddings, which are BERT's tied output head) for context
vectors ``h``. Each context has a fixed set of ``n_targets`` target outputs (a fixed
function of the context); the verifiable reward is 1 when the sampled output is a target.

Datasets (:attr:`CellConfig.dataset`; every context has squared norm ``d`` on average):

* ``gauss_random``: ``h ~ N(0, I_d)``; targets drawn at random per context (a lookup
  table: nothing to generalize).
* ``aniso_teacher``: anisotropic Gaussian contexts (covariance with eigenvalues
  ``~ i^-1`` in a random basis); targets the top ``n_targets`` outputs of a random Gaussian
  teacher ``T h`` (a linear target function shared by all contexts).
* ``embed_teacher``: real contexts: each ``h`` is the sum of 4 random MiniLM word-embedding
  rows from outside the policy's rows (ids 2508 and up), rescaled to norm ``sqrt(d)``;
  targets the top ``n_targets`` of another random teacher.

Geometries (:attr:`CellConfig.geometry`):

* ``real``: ``W`` itself.
* ``rotated``: ``W' = W R`` and contexts ``h' = R^T h`` with a random orthogonal ``R``
  (QR of a Gaussian, signs fixed): ``W' h' = W h``, so the policy is the same function
  but the coordinate basis of the weights is not.
* ``random``: a Gaussian matrix of the same shape and Frobenius norm.
"""
from __future__ import annotations

import torch

from gatesim.sim.config import CellConfig
from gatesim.weights import bundled_model_path, load_matrix

__all__ = ["Task", "random_orthogonal"]


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal ``d x d`` matrix (fp64 QR of a Gaussian, column signs
    fixed by ``diag(R) > 0``), returned in fp64."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _contexts_and_targets(cfg: CellConfig, full: torch.Tensor, V: int, d: int,
                          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts ``(n_contexts, d)`` and targets ``(n_contexts, n_targets)`` (distinct
    outputs per context) of ``cfg.dataset``; see the module docstring."""
    n = cfg.n_contexts
    if cfg.dataset == "gauss_random":
        h = torch.randn(n, d, generator=gen)
        targets = torch.stack([torch.randperm(V, generator=gen)[: cfg.n_targets]
                               for _ in range(n)])
        return h, targets
    if cfg.dataset == "aniso_teacher":
        basis = random_orthogonal(d, gen)
        scale = torch.arange(1, d + 1, dtype=torch.float64).pow(-0.5)
        scale = scale * (d / scale.pow(2).sum()).sqrt()  # E|h|^2 = d
        h = ((torch.randn(n, d, generator=gen, dtype=torch.float64) * scale) @ basis.T).float()
    else:  # embed_teacher
        lo = _EMBED_CONTEXT_ROWS
        if full.shape[0] - lo < 4 or full.shape[1] != d:
            raise ValueError(f"dataset embed_teacher needs rows {lo}.. of a matrix with "
                             f"{d} columns (the word embeddings); {cfg.matrix} is "
                             f"{tuple(full.shape)}")
        ids = torch.randint(lo, full.shape[0], (n, 4), generator=gen)
        h = full[ids].double().sum(1)
        h = (h * (d ** 0.5 / h.norm(dim=1, keepdim=True))).float()
        _ = torch.randn(1, generator=gen)  # a different teacher draw from aniso_teacher's
    teacher = torch.randn(V, d, generator=gen)
    targets = (h @ teacher.T).topk(cfg.n_targets, dim=1).indices
    return h, targets


#: first word-embedding row the ``embed_teacher`` contexts are drawn from (after the
#: default policy rows 1996..2507)
_EMBED_CONTEXT_ROWS = 2508


class Task:
    """Contexts, targets and the base matrix of one cell config (a pure function of
    ``matrix, path, rows, row_offset, geometry, n_contexts, n_targets, task_seed``)."""

    def __init__(self, cfg: CellConfig):
        path = cfg.path if cfg.path is not None else bundled_model_path()
        full = load_matrix(cfg.matrix, path)
        if cfg.row_offset + cfg.rows > full.shape[0]:
            raise ValueError(f"rows {cfg.row_offset}..{cfg.row_offset + cfg.rows - 1} do not fit "
                             f"{cfg.matrix} with {full.shape[0]} rows")
        w = full[cfg.row_offset: cfg.row_offset + cfg.rows].clone()
        if not torch.isfinite(w).all():
            raise ValueError(f"{cfg.matrix} has non-finite values in the chosen rows")
        self.V, self.d = w.shape
        if cfg.k > min(self.V, self.d):
            raise ValueError(f"k={cfg.k} exceeds min(rows, cols) = {min(self.V, self.d)}")
        gen = torch.Generator().manual_seed(cfg.task_seed)
        h, self.targets = _contexts_and_targets(cfg, full, self.V, self.d, gen)
        self.target_mask = torch.zeros(cfg.n_contexts, self.V, dtype=torch.bool)
        self.target_mask.scatter_(1, self.targets, True)
        geo_gen = torch.Generator().manual_seed(cfg.task_seed + 1)
        if cfg.geometry == "real":
            w0, hs = w, h
        elif cfg.geometry == "rotated":
            R = random_orthogonal(self.d, geo_gen)
            w0 = (w.double() @ R).float()
            hs = (h.double() @ R).float()  # rows h^T R = (R^T h)^T
            self.rotation = R
        else:
            g = torch.randn(self.V, self.d, generator=geo_gen, dtype=torch.float64)
            w0 = (g * (w.double().norm() / g.norm())).float()
            hs = h
        self.W0 = w0.contiguous()
        self.H = hs.contiguous()
        self.H_real = h
        self.W_real = w

    def logits(self, W: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(len(idx), V)`` logits of contexts ``idx`` under weights ``W``."""
        return self.H[idx] @ W.T

    def expected_reward(self, logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Exact expected reward per context: the probability mass on its targets."""
        return (logp.exp() * self.target_mask[idx]).sum(1)
