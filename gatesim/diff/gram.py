"""The diff's exact SVD path. One home: :mod:`gatesim.metrics.gram` (the Gram-matrix
eigendecomposition with its accuracy bounds, guards and fallbacks), shared with
:func:`gatesim.metrics.compare`; this name stays for the diff's callers."""
from gatesim.metrics.gram import (FALLBACK_RATIO, RTOL, _apply, _cols64, _eig_topk,  # noqa: F401
                                  _gram, _one_blas_thread, _rows64, gram_svd, gram_tau,
                                  gram_values, nss_checked, value_bounds)

__all__ = ["gram_svd", "FALLBACK_RATIO"]
