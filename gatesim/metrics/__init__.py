"""The papers' measurements of an update ``W0 -> W1``, each next to its random baseline.

Every formula is the one in docs/metrics.md; each function's docstring names its section.
Works on torch tensors, CPU or CUDA.

**Checked functions and fast cores.** Each public function checks its arguments (types,
shapes, devices, finiteness) and then calls its metric's core, which computes the same
numbers without checks, on the representation the checkpoint diff already holds
(decompositions, numpy masks, reused buffers): :func:`update_mask_core`,
:func:`nss_core`, :func:`principal_angles_core`, :func:`select_core` (Top/Bottom_alpha),
:func:`principal_mask_core`, :func:`low_magnitude_mask_core`, :func:`overlap_core`,
:func:`overlap_excluding_core`, :func:`update_energy_core`. A core trusts its caller: pass it what the public function
would have accepted.

* Sparsity (:mod:`~gatesim.metrics.sparsity`): :func:`sparsity` (bitwise, relative probe,
  absolute tolerance, ULP histogram in one :class:`SparsityResult`), :func:`update_mask`,
  :func:`ulp_keys`, :func:`ulp_distance`, :func:`ulp_histogram`.
* Gram path (:mod:`~gatesim.metrics.gram`, shared with ``gatesim.diff``): every singular
  value and the top-``k`` vectors from the Gram matrix, per-value error bounds, and the
  guards that fall back to ``gesdd``; :func:`compare`'s exact default.
* SVD engine (:mod:`~gatesim.metrics.svd`): :func:`base_svd` (exact by default, cached;
  randomized on request with ``q >= 2k``, ``niter >= 8`` enforced and error estimates),
  :class:`BaseSVD`, :class:`SVDCache`, :func:`singular_values`.
* Spectral (:mod:`~gatesim.metrics.spectral`): :func:`nss`, :func:`principal_angles`,
  :func:`subspace_angles`, :func:`update_energy`, :func:`effective_rank`,
  :func:`stable_rank`, :func:`spectral`.
* Masks (:mod:`~gatesim.metrics.masks`): :func:`top_alpha`, :func:`bottom_alpha`,
  :func:`principal_mask`, :func:`low_magnitude_mask`, :func:`overlap`,
  :func:`overlap_excluding`, :func:`jaccard`, :func:`random_mask`.
* Similarity (:mod:`~gatesim.metrics.similarity`): :func:`cosine` of two updates with its
  random baseline (mean 0, sd ``1/sqrt(N)``).
* Batch (:mod:`~gatesim.metrics.batch`): :func:`compare` (one row), :func:`table`
  (pandas DataFrame, one row per matrix, tqdm progress bar).

Example::

    import torch, gatesim.metrics as gm
    W0 = torch.randn(384, 384) * 0.02
    W1 = W0 + 1e-3 * torch.randn(384, 384) * (torch.rand(384, 384) < 0.1)
    W0, W1 = W0.to(torch.bfloat16), W1.to(torch.bfloat16)
    gm.sparsity(W0, W1).bitwise                   # fraction of unchanged stored bits
    gm.principal_angles(W0, W1, k=16).left_max    # degrees
    df = gm.table({"q": (W0, W1)}, k=16, alpha=0.05)
"""
from gatesim.metrics.batch import compare, table
from gatesim.metrics.masks import (Jaccard, Overlap, bottom_alpha, jaccard, jaccard_baseline,
                                   low_magnitude_mask, low_magnitude_mask_core, overlap,
                                   overlap_core, overlap_excluding, overlap_excluding_core,
                                   principal_mask, principal_mask_core, random_mask,
                                   select_core, select_count, top_alpha)
from gatesim.metrics.sparsity import (DEFAULT_ATOL, DEFAULT_ETA, SparsityResult, sparsity,
                                      ulp_bin_edges, ulp_bin_labels, ulp_distance,
                                      ulp_histogram, ulp_keys, update_mask, update_mask_core)
from gatesim.metrics.similarity import Cosine, cosine, cosine_baseline_sd
from gatesim.metrics.spectral import (Energy, PrincipalAngles, SpectralResult,
                                      effective_rank, energy_baseline, nss, nss_core,
                                      principal_angles, principal_angles_core, spectral,
                                      stable_rank, subspace_angles, update_energy,
                                      update_energy_core)
from gatesim.metrics.svd import (DEFAULT_CACHE, BaseSVD, SVDCache, base_svd, clear_svd_cache,
                                 compute_svd, singular_values)

__all__ = [
    "sparsity", "SparsityResult", "update_mask", "ulp_keys", "ulp_distance", "ulp_histogram",
    "ulp_bin_edges", "ulp_bin_labels", "DEFAULT_ETA", "DEFAULT_ATOL",
    "base_svd", "compute_svd", "BaseSVD", "SVDCache", "DEFAULT_CACHE", "clear_svd_cache",
    "singular_values",
    "nss", "principal_angles", "subspace_angles", "PrincipalAngles", "update_energy",
    "energy_baseline", "Energy", "effective_rank", "stable_rank", "spectral",
    "SpectralResult",
    "top_alpha", "bottom_alpha", "select_count", "principal_mask", "low_magnitude_mask",
    "overlap", "overlap_excluding", "Overlap", "jaccard", "jaccard_baseline", "Jaccard",
    "random_mask", "cosine", "cosine_baseline_sd", "Cosine",
    "compare", "table",
    "update_mask_core", "nss_core", "principal_angles_core", "select_core",
    "principal_mask_core", "low_magnitude_mask_core", "overlap_core", "overlap_excluding_core",
    "update_energy_core",
]
