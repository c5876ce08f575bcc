"""Exact-score Gaussian mixtures: the project's ground truth.

Each component has covariance ``Sigma_k = V_k diag(lam_k) V_k^T + s2_k I`` with orthonormal
``V_k`` (``d x r``): low-rank plus isotropic (``r = d`` gives a full covariance).  At VE noise level
``sigma`` the marginal is the mixture with ``Sigma_k + sigma^2 I``, whose precision and
log-determinant are closed form (Woodbury, with ``c_k = s2_k + sigma^2``):

    P_k = (I - V_k diag(lam_k / (lam_k + c_k)) V_k^T) / c_k
    log det = (d - r) log c_k + sum_j log(lam_kj + c_k)

Denoiser (Tweedie): ``D(x) = x + sigma^2 grad log p_sigma(x)`` with ``grad log p = -sum_k w_k P_k (x - mu_k)``
(``w_k`` the responsibilities), and its divergence
``div D = d + sigma^2 [sum_k w_k (||g_k||^2 - tr P_k) - ||grad log p||^2]`` with ``g_k = -P_k (x - mu_k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GaussianMixture", "GMM_PRESETS", "get_gmm"]


class GaussianMixture:
    """A Gaussian mixture with exact denoiser, score, divergence and sampling (float64 inside)."""

    def __init__(self, means: torch.Tensor, weights: torch.Tensor | None = None, *, basis: torch.Tensor | None = None,
                 lam: torch.Tensor | None = None, s2: torch.Tensor | float = 1e-2, name: str = "gmm"):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(means.shape)}")
        K, d = means.shape
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else weights
        w = torch.as_tensor(w, dtype=torch.float64)
        if w.shape != (K,) or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("weights must be K non-negative numbers summing to 1")
        if basis is None:
            basis = torch.zeros(K, d, 0, dtype=torch.float64)
            lam = torch.zeros(K, 0, dtype=torch.float64)
        basis = torch.as_tensor(basis, dtype=torch.float64)
        lam = torch.as_tensor(lam, dtype=torch.float64)
        if basis.shape[:2] != (K, d) or lam.shape != (K, basis.shape[2]) or (lam < 0).any():
            raise ValueError("basis must be (K, d, r) and lam (K, r) non-negative")
        s2 = torch.as_tensor(s2, dtype=torch.float64).expand(K).clone()
        if (s2 <= 0).any():
            raise ValueError("isotropic variances s2 must be positive")
        self.means, self.weights, self.basis, self.lam, self.s2, self.name = means, w, basis, lam, s2, name
        self.K, self.dim, self.rank = K, d, basis.shape[2]

    @classmethod
    def from_covariances(cls, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor | None = None,
                         name: str = "gmm") -> "GaussianMixture":
        """Mixture with full covariances ``covs`` (K, d, d), symmetric positive definite."""
        covs = torch.as_tensor(covs, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(covs)
        if (evals <= 0).any():
            raise ValueError("covariances must be positive definite")
        s2 = 0.5 * evals.min(dim=1).values
        return cls(means, weights, basis=evecs, lam=evals - s2[:, None], s2=s2, name=name)

    # --- device ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the mixture's parameters live (and its denoiser computes)."""
        return self.means.device

    def to(self, device: str | torch.device) -> "GaussianMixture":
        """Move the parameters to ``device``, in place (as ``nn.Module.to``); returns ``self``.
        Sampling still draws from CPU generators (the same samples on any device)."""
        device = torch.device(device)
        for k in ("means", "weights", "basis", "lam", "s2"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    # --- marginal at noise level sigma -------------------------------------------------------
    def _components(self, x: torch.Tensor, sigma: torch.Tensor):
        """Per-component log densities, precision-times-residual and trace of precision."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        if xf.device != self.means.device:
            raise ValueError(f"the mixture is on {self.means.device} but its input is on {xf.device}; "
                             f"move one of them (gmm.to({str(xf.device)!r}) or x.to({str(self.means.device)!r}))")
        sig2 = torch.as_tensor(sigma, dtype=torch.float64, device=xf.device).reshape(-1, 1) ** 2  # (B,1) or (1,1)
        c = self.s2[None, :] + sig2  # (B,K)
        y = xf[:, None, :] - self.means[None]  # (B,K,d)
        q = torch.einsum("bkd,kdr->bkr", y, self.basis)  # (B,K,r)
        lc = self.lam[None] + c[..., None]  # (B,K,r)
        shrink = self.lam[None] / lc
        Py = (y - torch.einsum("bkr,kdr->bkd", shrink * q, self.basis)) / c[..., None]
        maha = ((y * Py).sum(-1))
        logdet = (self.dim - self.rank) * torch.log(c) + torch.log(lc).sum(-1)
        logp = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi)) + torch.log(self.weights)[None]
        trP = (self.dim - self.rank) / c + (1.0 / lc).sum(-1)
        return xf, sig2, logp, Py, trP

    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """``log p_sigma(x)`` per sample."""
        _, _, logp, _, _ = self._components(x, sigma)
        return torch.logsumexp(logp, dim=1)

    def responsibilities(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        _, _, logp, _, _ = self._components(x, sigma)
        return torch.softmax(logp, dim=1)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``grad_x log p_sigma(x)`` (VE coordinates)."""
        _, _, logp, Py, _ = self._components(x, sigma)
        w = torch.softmax(logp, dim=1)
        return (-(w[..., None] * Py).sum(1)).reshape(x.shape).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact ``D(x, sigma) = E[x0 | x] = x + sigma^2 grad log p_sigma(x)`` (Tweedie)."""
        xf, sig2, logp, Py, _ = self._components(x, sigma)
        w = torch.softmax(logp, dim=1)
        out = xf - sig2 * (w[..., None] * Py).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def divergence(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Exact ``div_x D(x, sigma)`` per sample (closed form, module docstring)."""
        xf, sig2, logp, Py, trP = self._components(x, sigma)
        w = torch.softmax(logp, dim=1)
        s = -(w[..., None] * Py).sum(1)
        lap = (w * ((Py**2).sum(-1) - trP)).sum(1) - (s**2).sum(-1)
        return (self.dim + sig2.reshape(-1) * lap).to(x.dtype)

    def epsilon_net(self, process) -> "callable":
        """An epsilon-prediction network ``eps(x_vp, t)`` on a VP ``process`` (for adapter tests)."""
        def eps(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            sigma = process.t_to_sigma(t.to(torch.float64))
            s = sigma.reshape(-1, *([1] * (x_vp.ndim - 1)))
            x = process.to_ve(x_vp, s)
            return (x - self.denoise(x, sigma)) / s.to(x_vp.dtype)
        return eps

    def velocity_net(self, time_scale: float = 1.0) -> "callable":
        """The velocity ``v(x_t, t * time_scale) = E[eps - x0 | x_t]`` of this mixture seen through the flow
        process ``x_t = (1 - t) x0 + t eps`` (:class:`~steindiff.noise.FlowProcess`), exactly: with
        ``D`` the denoiser at ``sigma = t / (1 - t)`` of ``x_ve = x_t / (1 - t)``, ``v = (x_t - D) / t``; at ``t = 1``
        (where flow pipelines start) its limit, ``D = E[x0]``."""
        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t.to(torch.float64).reshape(-1).expand(x_t.shape[0]) / time_scale
            one = t >= 1
            ts = torch.where(one, torch.full_like(t, 0.5), t)  # any t < 1 where t = 1: replaced below
            tb = ts.reshape(-1, *([1] * (x_t.ndim - 1)))
            xf = x_t.to(torch.float64)
            d = self.denoise(xf / (1 - tb), ts / (1 - ts))
            mean = (self.weights[:, None] * self.means).sum(0).reshape(1, *x_t.shape[1:])
            d = torch.where(one.reshape(-1, *([1] * (x_t.ndim - 1))), mean, d)
            return ((xf - d) / torch.where(one, torch.ones_like(t), t).reshape(tb.shape)).to(x_t.dtype)
        return velocity

    # --- sampling ----------------------------------------------------------------------------
    def sample(self, n: int, sigma: float = 0.0, *, generator: torch.Generator | None = None, seed: int | None = None,
               return_labels: bool = False):
        """Exact samples of ``p_sigma`` (data plus ``sigma`` noise), float64, on the mixture's device.
        Drawn on the CPU (``generator``: a CPU generator), so a seed gives the same samples anywhere."""
        g = generator or torch.Generator().manual_seed(0 if seed is None else seed)
        means, weights, basis, lam, s2 = (t.cpu() for t in (self.means, self.weights, self.basis, self.lam, self.s2))
        labels = torch.multinomial(weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.rank, generator=g, dtype=torch.float64)
        e = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        x = means[labels] + torch.einsum("ndr,nr->nd", basis[labels], z * lam[labels].sqrt())
        x = x + e * s2[labels].sqrt()[:, None]
        if sigma > 0:
            x = x + sigma * torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        x, labels = x.to(self.device), labels.to(self.device)
        return (x, labels) if return_labels else x

    def second_moment(self) -> float:
        """``E||x0||^2 / d``."""
        tr = self.lam.sum(1) + self.dim * self.s2
        return float((self.weights * ((self.means**2).sum(1) + tr)).sum() / self.dim)

    def __repr__(self) -> str:
        return f"GaussianMixture(name={self.name!r}, K={self.K}, dim={self.dim}, rank={self.rank})"


@dataclass(frozen=True)
class _Preset:
    dim: int
    K: int
    rank: int
    mean_scale: float
    lam_range: tuple[float, float]
    s: float
    weights: str  # "equal" or "unequal"
    seed: int


GMM_PRESETS: dict[str, _Preset] = {
    "toy2d": _Preset(2, 8, 0, 1.0, (0, 0), 0.05, "equal", 0),
    "image64": _Preset(64, 10, 3, 0.5, (0.02, 0.1), 0.03, "unequal", 1),
    "image64-sharp": _Preset(64, 10, 3, 0.5, (0.02, 0.1), 0.005, "unequal", 1),
    "image64-close": _Preset(64, 10, 3, 0.2, (0.02, 0.1), 0.03, "unequal", 1),
    "image64-equal": _Preset(64, 10, 3, 0.5, (0.02, 0.1), 0.03, "equal", 1),
    "hd1024": _Preset(1024, 8, 8, 0.5, (0.02, 0.1), 0.03, "unequal", 2),
}


def get_gmm(name: str) -> GaussianMixture:
    """A preset mixture by name (``toy2d``, ``image64``, ``hd1024`` and variations; the ``gmm:``
    prefix is accepted).  Every preset is built from a fixed seed.

    ``toy2d``: 8 isotropic modes on the unit circle.  ``image64``/``hd1024``: data near a few
    low-rank pieces (rank 3 / 8 plus small isotropic noise), unequal weights ``~ 0.75^k``.
    Variations: ``-sharp`` (isotropic std 0.005: large denoiser Lipschitz constant at small noise),
    ``-close`` (means 2.5x closer), ``-equal`` (equal weights).
    """
    key = name.removeprefix("gmm:")
    if key not in GMM_PRESETS:
        raise ValueError(f"unknown mixture preset {name!r}; choose one of {', '.join('gmm:' + k for k in GMM_PRESETS)}")
    p = GMM_PRESETS[key]
    g = torch.Generator().manual_seed(p.seed)
    if key == "toy2d":
        ang = torch.arange(p.K, dtype=torch.float64) * 2 * math.pi / p.K
        means = torch.stack([ang.cos(), ang.sin()], 1) * p.mean_scale
    else:
        means = torch.randn(p.K, p.dim, generator=g, dtype=torch.float64) * p.mean_scale
    basis, lam = None, None
    if p.rank > 0:
        basis = torch.linalg.qr(torch.randn(p.K, p.dim, p.rank, generator=g, dtype=torch.float64))[0]
        lo, hi = p.lam_range
        lam = lo + (hi - lo) * torch.rand(p.K, p.rank, generator=g, dtype=torch.float64)
        # spread along each piece comparable to the distance between pieces
        lam = lam * p.dim / 8
    if p.weights == "equal":
        w = torch.full((p.K,), 1.0 / p.K, dtype=torch.float64)
    else:
        w = 0.75 ** torch.arange(p.K, dtype=torch.float64)
        w = w[torch.randperm(p.K, generator=g)]
        w = w / w.sum()
    return GaussianMixture(means, w, basis=basis, lam=lam, s2=p.s**2, name="gmm:" + key)
