r"""Fast, certified top-r bases and LoRA-X transfer at Stable Diffusion scale.

The reference path (:func:`lorax_ref.svd_topk` + :mod:`lorax_ref.core`) takes a **full float64 SVD** of
the source and of the target weight of every layer: :math:`O(mn\min(m,n))` work, most of it in
memory-bound LAPACK stages. Eq. (3) needs far less:

.. math:: \Delta W_{t\leftarrow s} = \bar U_t\,\Delta\Sigma_{t\leftarrow s}\,\bar V_t^\top, \qquad
          \Delta\Sigma_{t\leftarrow s} = \bar U_t^\top \bar U_s\,\Delta\Sigma_s\,\bar V_s^\top \bar V_t \quad (r\times r)

only the top-r singular triplets of :math:`W_s` (Eq. (1) pairs :math:`u_i` with :math:`v_i`) and the top-r
subspaces of :math:`W_t`. This module computes them with one algorithm, ``"mixed"``, for a weight
:math:`W` (m×n, worked on from its smaller side m ≤ n, :math:`A = WW^\top`):

1. **float32 eigendecomposition of the small Gram matrix** :math:`A_{32} = W_{32}W_{32}^\top = X\Lambda X^\top`
   (one GEMM and one m×m ``eigh``: no bidiagonalisation of W, no n-sided vectors);
2. **one Newton step with a float64 residual** on the top :math:`k = r + p` columns:
   :math:`R = W(W^\top X_k) - X_k\Lambda_k` in float64 (two m×n×k GEMMs), then
   :math:`X_k \leftarrow X_k + X_\perp E`, :math:`E_{ji} = (X_\perp^\top R)_{ji} / (\lambda_i - \lambda_j)`
   — the float32 eigenbasis acts as an approximate inverse of :math:`A - \lambda_i I` on the complement;
3. **Rayleigh–Ritz in float64** on the corrected k-dimensional span: the k×k problem
   :math:`Q^\top A Q = C\Theta^2C^\top` separates close singular values exactly (to float64 rounding);
4. **a certificate** from the residual :math:`R = AY - Y\Theta^2` of the Ritz vectors (already known:
   no extra pass over W), bounding every angle — see :func:`ritz_certificate`.

Why it is accurate. A float32 ``eigh`` leaves in eigenvector *i* a component
:math:`\approx u_{32}\lVert A\rVert/(\lambda_i - \lambda_j)` along every other eigenvector *j*
(:math:`u_{32} = 6\cdot10^{-8}`). The components *inside* the top-k span (adjacent, close singular values:
the ill-conditioned ones) are removed exactly by step 3. The components *outside* it have gaps of at
least :math:`\lambda_r - \lambda_{k+1}` (the oversampling p buys this gap); step 2 divides the float64
residual by those same gaps, so they shrink from about :math:`10^{-6}` to second order,
:math:`\approx 10^{-6}\cdot u_{32}\lVert A\rVert/(\lambda_r-\lambda_{k+1})` (measured on 1280-wide layers:
the Ritz residuals drop from ~3e-7 λ₁ to ~5e-13 λ₁, the vectors agree with a float64 SVD to ~1e-11). What remains is
measured, not assumed: the certificate turns the float64 residual into bounds on
:math:`\lVert \hat u_i - u_i\rVert`, :math:`\lVert\hat v_i - v_i\rVert` and
:math:`\lVert \hat U\hat U^\top - UU^\top\rVert_2`, and :meth:`LayerPair.bound` into a bound on
:math:`\lVert\Delta\hat W_{t\leftarrow s}-\Delta W_{t\leftarrow s}\rVert_F / \lVert\Delta W_{t\leftarrow s}\rVert_F`.
A layer whose bound exceeds the tolerance (:data:`TOL` = 1e-6) is recomputed with the reference
:func:`~lorax_ref.svd_topk` (``method="svd"``), so the fast path never returns an uncertified answer.

Why not a randomized range finder: the spectra of real attention weights decay slowly near r. On the
singular-value profile measured on all-MiniLM-L6-v2 (:data:`MINILM_PROFILE`), a 1280-wide layer with
r = 320, k = 400 has :math:`(\sigma_{k+1}/\sigma_r)^2\approx 0.74`: subspace iteration would need ~70
passes over W to reach 1e-9, against the two float64 passes of step 2.

``"gram64"`` is the same pipeline with a float64 ``eigh`` and no Newton step (small layers, m ≤ 384).
``"svd"`` is the reference itself; ``"auto"`` picks it when r + p covers most of min(m, n) (see
:func:`lorax_ref.fast.solver._choose`): there the smallest singular values matter and nothing is left to save.

Second adapter on the same base pair: the bases and the two r×r rotations
:math:`R_U = \bar U_t^\top\bar U_s`, :math:`R_V = \bar V_s^\top \bar V_t` are kept in a :class:`LayerPair`; a new
:math:`\Delta\Sigma_s` then costs :math:`O(r^3)` for :math:`\Delta\Sigma_{t\leftarrow s}` (the compact
LoRA-X result), :math:`O((m+n)r)` for the LoRA factors (:meth:`LayerPair.factors`), plus one m×r×n
product if the dense :math:`\Delta W_{t\leftarrow s}` is wanted.

Everything is torch: it runs on CUDA (batched over same-shaped layers) as well as on CPU. TF32 is
switched off inside these functions: a TF32 Gram matrix would lose ~3 digits the Newton step cannot
recover within its budget. On a CPU, layers of a batch are spread over the intra-op threads (one LAPACK
call per core: the tridiagonal reduction inside ``eigh`` gains little from a second thread).

Where the time goes (``scripts/benchmark.py``, 2-core CPU, one thread, 1280×1280, r = 320): the float32
``eigh`` ~40 %, the k×k Rayleigh–Ritz ~18 %, the two float64 passes ~15 %, the Gram matrix ~10 %. The
``eigh`` is the one cubic step left; it is why the first transfer of a whole SD-1.5 or SDXL UNet is
1.6–2.9× (one thread) or 1.6–3.3× (both cores, two runs) faster than two full SVDs per layer on that
machine (README, *Fast path*), not 5×, while a second adapter
(cached :class:`LayerPair`) costs its LoRA factors in O((m+n)r), O(r³) in the compact form, or one
m×r×n product for the dense matrix.
"""
from .certificate import Bases, Certificate, ritz_certificate
from .pair import LayerPair, pair_bases, pair_bases_group, transfer_fast
from .solver import BASIS_METHODS, TOL, default_oversample, top_r_bases, top_r_bases_group
from .synthetic import MINILM_PROFILE, haar_basis, synthetic_layer, synthetic_pair, synthetic_spectrum

__all__ = [
    "BASIS_METHODS",
    "MINILM_PROFILE",
    "TOL",
    "Bases",
    "Certificate",
    "LayerPair",
    "default_oversample",
    "haar_basis",
    "pair_bases",
    "pair_bases_group",
    "ritz_certificate",
    "synthetic_layer",
    "synthetic_pair",
    "synthetic_spectrum",
    "top_r_bases",
    "top_r_bases_group",
    "transfer_fast",
]
