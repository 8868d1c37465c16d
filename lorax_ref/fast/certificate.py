r"""The a posteriori certificate of the fast bases: bounds on every computed singular vector and subspace.

See :mod:`lorax_ref.fast` for the algorithm whose Ritz pairs these bounds certify.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------


@dataclass
class Certificate:
    r"""A posteriori error bounds of one set of top-r bases (all on CPU, float64).

    For the exact triplets :math:`(u_i, \sigma_i, v_i)` of W (signs aligned with the computed ones):

    * ``err_u[i]`` ≥ :math:`\lVert\hat u_i - u_i\rVert`, ``err_v[i]`` ≥ :math:`\lVert\hat v_i - v_i\rVert`
      (what Eq. (1) needs: it pairs :math:`u_i` with :math:`v_i`);
    * ``subspace_u`` ≥ :math:`\lVert\sin\Theta(\hat U, U)\rVert_F \ge \lVert\hat U\hat U^\top - UU^\top\rVert_2`,
      ``subspace_v`` likewise (what Eq. (3) needs from the target);
    * ``gap``: :math:`(\hat\sigma_r^2 - \mu)/\hat\sigma_1^2`, the relative distance from the r-th value
      to the spectrum outside the Ritz space (μ estimated from the float32/float64 eigenvalues).

    ``method == "svd"`` means the bases *are* the reference computation: all bounds are 0 by definition.
    For a full (non-diagonal) ΔΣ_s the comparison also assumes both computations pick the same signs
    (the convention of :func:`~lorax_ref.linalg.sign_convention`, which can disagree only when two entries
    of :math:`u_i` tie in magnitude); a diagonal ΔΣ_s does not depend on signs.
    The one ingredient that is estimated rather than proven is μ, the top of the spectrum of W outside
    the Ritz space: it is taken from the eigenvalue :math:`\lambda_{k+1}` of the Gram matrix plus an
    allowance for its backward error (1e-5 λ₁ in float32, 1e-12 λ₁ in float64).
    """

    method: str
    k: int
    err_u: torch.Tensor  # (r,)
    err_v: torch.Tensor  # (r,)
    subspace_u: float
    subspace_v: float
    gap: float
    corrected: bool = False  # a Newton step was applied

    @classmethod
    def reference(cls, r: int) -> Certificate:
        """The certificate of the reference SVD: every bound 0 by definition."""
        zero = torch.zeros(r, dtype=torch.float64)
        return cls("svd", r, zero, zero.clone(), 0.0, 0.0, math.nan)

    def triplet_error(self, dSigma_s: torch.Tensor) -> float:
        r"""Bound on :math:`\lVert \hat U\Delta\Sigma\hat V^\top - U\Delta\Sigma V^\top\rVert_F` (Eq. (1))."""
        d = dSigma_s.detach().double().cpu()
        if d.ndim == 1:  # Σ_i |δσ_i| (‖û_i − u_i‖ + ‖v̂_i − v_i‖)
            return float((d.abs() * (self.err_u + self.err_v)).sum())
        spec = float(torch.linalg.matrix_norm(d, ord=2))  # ‖ΔΣ‖₂ (‖Û − U‖_F + ‖V̂ − V‖_F)
        return spec * float(self.err_u.norm() + self.err_v.norm())

    def as_dict(self) -> dict:
        """The bounds as JSON-able numbers (largest per-vector error per side)."""
        return {
            "method": self.method,
            "k": self.k,
            "max_err_u": float(self.err_u.max()) if self.err_u.numel() else 0.0,
            "max_err_v": float(self.err_v.max()) if self.err_v.numel() else 0.0,
            "subspace_u": self.subspace_u,
            "subspace_v": self.subspace_v,
            "gap": self.gap,
            "corrected": self.corrected,
        }


@dataclass
class Bases:
    """Top-r bases ``U (m, r)``, ``S (r,)``, ``V (n, r)`` (float64, sign convention of svd_topk) + bounds."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    cert: Certificate

    @property
    def r(self) -> int:
        """The rank r (columns of ``U``)."""
        return self.U.shape[1]


# ---------------------------------------------------------------------------------------------------
# The certificate
# ---------------------------------------------------------------------------------------------------


def ritz_certificate(
    theta2: torch.Tensor, res: torch.Tensor, res_in: torch.Tensor, mu: torch.Tensor | None, r: int
) -> dict[str, torch.Tensor]:
    r"""Bounds for Ritz pairs of :math:`A = WW^\top` from their residuals (batched over layers).

    Setting: orthonormal Q (m×k), Ritz pairs :math:`(\theta_j^2, y_j)` of :math:`Q^\top A Q`, residual
    :math:`R = AY - Y\Theta^2`, split into :math:`R_{in} = Y^\top R` (rounding level: exactly 0 for an exact
    Rayleigh–Ritz) and the rest. μ ≥ the largest eigenvalue of A on the complement of span(Q)
    (``None``: k = m, no complement). For an exact unit eigenvector x of A (eigenvalue λ near
    :math:`\theta_i^2`), write :math:`x = \sum_j c_j y_j + Q_\perp b`. The eigen-equation projected on
    span(Q) and on its complement gives

    .. math:: |c_j| \le \frac{\lVert e_j^\top R_{in}\rVert + \lVert r_j\rVert\,\beta}{|\lambda-\theta_j^2|},
              \qquad \beta = \lVert b\rVert \le \frac{\lVert r_i\rVert + \gamma\,\rho}{\lambda-\mu},
              \qquad \gamma = \Big(\sum_{j\ne i} c_j^2\Big)^{1/2}

    (ρ = ‖R‖_F), a pair of linear inequalities solved for β and γ. Bauer–Fike places λ within ‖r_i‖ of
    :math:`\theta_i^2`, which enters every gap (a gap that this uncertainty closes gives an infinite
    bound). The sine of the angle is :math:`\sqrt{\beta^2+\gamma^2}`:
    *second order* in the adjacent gaps — an ill-separated pair :math:`\theta_i \approx \theta_{i+1}`
    costs only through :math:`R_{in}` (rounding) and ρβ, unlike the first-order Davis–Kahan bound
    ‖r_i‖/gap_i — and first order only in the gap to the complement, which the oversampling keeps wide
    (after Nakatsukasa, *Sharp error bounds for Ritz vectors and approximate singular vectors*, 2020).

    Args:
        theta2: ``(B, k)`` Ritz values, descending. res: ``(B, k)`` ‖r_j‖ (with rounding allowance).
        res_in: ``(B, k)`` ‖R_in e_j‖ (with allowance). mu: ``(B,)`` or None. r: how many to bound.

    Returns:
        per layer ``sin (B, r)``, ``beta``, ``gamma_out`` (components outside span(Y_r)), ``rho``, ``lam_lo``.
    """
    B, k = theta2.shape
    rho = res.pow(2).sum(-1).sqrt()  # (B,) ‖R‖_F
    loc = res[:, :r]  # (B, r) Bauer–Fike: an eigenvalue λ_i lies within ‖r_i‖ of θ_i²
    t_i = theta2[:, :r, None]  # (B, r, 1)
    D = (t_i - theta2[:, None, :]).abs() - loc[:, :, None]  # (B, r, k) lower bound on |λ_i − θ_j²|
    own = torch.eye(r, k, dtype=torch.bool, device=theta2.device).expand(B, r, k)
    D = torch.where(own, torch.full_like(D, math.inf), D)  # j = i does not count
    ok = (D > 0) | own
    inv = torch.where(ok, 1.0 / D.clamp_min(1e-300), torch.full_like(D, math.inf))  # (B, r, k)
    inv = torch.where(own, torch.zeros_like(inv), inv)
    out = (torch.arange(k, device=theta2.device) >= r).to(theta2.dtype)  # columns outside span(Y_r)
    theta = theta2.clamp_min(0).sqrt()[:, None, :]  # (B, 1, k) gain of Wᵀ on y_j

    def norms(weight):  # (a, b) with (Σ_j (w_j |c_j|)²)^½ ≤ a + b β
        a = (weight * res_in[:, None, :] * inv).pow(2).sum(-1).sqrt()  # (B, r) rounding part
        b = (weight * res[:, None, :] * inv).pow(2).sum(-1).sqrt()  # (B, r)
        return a, b

    a, b = norms(1.0)  # γ ≤ a + b β
    a_th, b_th = norms(theta)  # ‖Wᵀ Σ_j c_j y_j‖ ≤ a_th + b_th β
    a_out, b_out = norms(out)  # components on y_j, j > r
    if mu is None:  # k = m: Q spans everything, no component outside it
        beta = torch.zeros_like(a)
    else:
        d_perp = theta2[:, :r] - loc - mu[:, None]  # (B, r) lower bound on λ_i − μ
        denom = d_perp - b * rho[:, None]
        beta = torch.where(denom > 0, (res[:, :r] + a * rho[:, None]) / denom.clamp_min(1e-300),
                           torch.full_like(denom, math.inf))
    gamma = a + b * beta
    sin = (beta.pow(2) + gamma.pow(2)).sqrt().nan_to_num(nan=math.inf)
    return {"sin": sin, "beta": beta, "gamma": gamma, "gamma_theta": a_th + b_th * beta,
            "gamma_out": a_out + b_out * beta, "rho": rho, "loc": loc, "lam_lo": theta2[:, :r] - loc}


def _certificates(method, k, theta2, res, res_in, mu, r, corrected) -> list[Certificate]:
    """Turn :func:`ritz_certificate` into per-vector and subspace bounds for U and V (per layer)."""
    c = ritz_certificate(theta2, res, res_in, mu, r)
    sin, beta, gamma_out = c["sin"], c["beta"], c["gamma_out"]
    theta = theta2.clamp_min(0).sqrt()  # (B, k)
    sig_lo = c["lam_lo"].clamp_min(0).sqrt()  # (B, r) lower bound on σ_i
    sqrt_mu = mu.clamp_min(0).sqrt()[:, None] if mu is not None else torch.zeros_like(beta[:, :1])
    th_i = theta[:, :r]
    # ‖û_i − u_i‖ ≤ √2 sin θ (sign aligned, cos ≥ 0)
    err_u = math.sqrt(2.0) * sin
    # v̂_i = Wᵀû_i/θ_i, v_i = Wᵀu_i/σ_i: ‖v̂ − v‖ ≤ (θ_i sin² + ‖Wᵀ Σ_j c_j y_j‖ + √μ β)/θ_i + |σ_i − θ_i|/θ_i
    err_v = (th_i * sin.pow(2) + c["gamma_theta"] + sqrt_mu * beta) / th_i \
        + c["loc"] / (th_i * (th_i + sig_lo))
    # target: ‖sinΘ(Û_r, U_r)‖_F² = Σ_i (β_i² + Σ_{j>r} c_j²);  V side through Wᵀ with gain ≤ max(θ_{r+1}, √μ)
    blk = (beta.pow(2) + gamma_out.pow(2)).sqrt()  # (B, r)
    sub_u = blk.pow(2).sum(-1).sqrt()  # (B,)
    theta_next = theta[:, r:r + 1] if theta.shape[1] > r else torch.zeros_like(theta[:, :1])
    dist_v = (theta_next * gamma_out + sqrt_mu * beta) / sig_lo.clamp_min(1e-300)  # (B, r)
    sub_v = dist_v.pow(2).sum(-1).sqrt()
    lam1 = theta2[:, 0].clamp_min(1e-300)
    gap = ((theta2[:, r - 1] - mu) / lam1) if mu is not None else torch.full_like(lam1, math.nan)
    certs = []
    for b in range(theta2.shape[0]):
        bad = lambda x: x.nan_to_num(nan=math.inf).cpu()
        certs.append(Certificate(method, k, bad(err_u[b]), bad(err_v[b]), float(bad(sub_u[b])),
                                 float(bad(sub_v[b])), float(gap[b]), corrected))
    return certs

