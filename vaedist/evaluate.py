"""Evaluation that is deterministic per datapoint: the same key gives the same numbers whatever batch
it lands in, on however many workers. No Ray.

Each datapoint (split, index) gets fixed binarised pixels (data.fixed_binarize) and its own seeded
noise for z, so a distributed evaluation, a single-process recomputation and the encode job agree.
"""

from __future__ import annotations

import numpy as np
import torch

from vaedist.losses import importance_log_px, negative_elbo

SPLIT_IDS = {"train": 0, "test": 1}
# Separate noise streams per purpose, so changing K does not change the z used for recon_nll.
STREAM_MC, STREAM_IW, STREAM_Z = 0, 1, 2


def key_seed(seed: int, split: str, index: int, stream: int) -> int:
    """A 63-bit seed unique to (seed, split, index, stream)."""
    value = ((seed * 1_000_003 + SPLIT_IDS[split]) * 100_000_007 + int(index)) * 8 + stream
    return value & (2**63 - 1)


def per_key_normal(indices: np.ndarray | torch.Tensor, split: str, seed: int, stream: int,
                   num_samples: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise [B, num_samples, dim], row i drawn from its own key's generator."""
    gen = torch.Generator()
    rows = []
    for index in np.asarray(indices).tolist():
        gen.manual_seed(key_seed(seed, split, index, stream))
        rows.append(torch.randn(num_samples, dim, generator=gen, dtype=dtype))
    if not rows:
        return torch.empty(0, num_samples, dim, dtype=dtype)
    return torch.stack(rows)


@torch.no_grad()
def evaluate_batch(model, x: torch.Tensor, indices, split: str, seed: int, num_samples_mc: int = 1,
                   num_samples_iw: int = 0, iw_chunk_size: int = 100) -> dict[str, torch.Tensor]:
    """Per-datapoint results for binarised x [B, P]: mu, logvar, z (one posterior sample),
    recon_nll, kl, loss (= recon_nll + kl) and, when num_samples_iw > 0, log_px and gap (= log_px + loss)."""
    latent_dim = model.latent_dim
    device = x.device
    mu, logvar = model.encode(x)
    eps_mc = per_key_normal(indices, split, seed, STREAM_MC, num_samples_mc, latent_dim).to(device)
    parts = negative_elbo(model, x, num_samples_mc, eps=eps_mc)
    eps_z = per_key_normal(indices, split, seed, STREAM_Z, 1, latent_dim).to(device)[:, 0]
    # float64 sums, so that loss == recon_nll + kl and gap == log_px + loss hold exactly in the table.
    recon_nll, kl = parts.recon_nll.double(), parts.kl.double()
    out = {
        "mu": mu.float(), "logvar": logvar.float(),
        "z": (mu + torch.exp(0.5 * logvar) * eps_z).float(),
        "recon_nll": recon_nll, "kl": kl, "loss": recon_nll + kl,
    }
    if num_samples_iw > 0:
        eps_iw = per_key_normal(indices, split, seed, STREAM_IW, num_samples_iw, latent_dim).to(device)
        log_px = importance_log_px(model, x, num_samples_iw, chunk_size=iw_chunk_size, eps=eps_iw).double()
        out["log_px"] = log_px
        out["gap"] = log_px + out["loss"]
    return out
