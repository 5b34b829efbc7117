"""Evaluation that is deterministic per datapoint: the same key gets the same input and the same
noise whatever batch, worker or device it lands on, so its numbers differ only by float32 rounding
(bit-identical for the same batching, thread count and kernels: the determinism contract,
docs/concepts/determinism.md). No Ray.

Each datapoint (split, index) gets a fixed input (the likelihood's eval_input: for Bernoulli, the
fixed binarisation data.fixed_binarize) and its own noise
for z from the counter-based generator in vaedist.rng (keyed by seed, split, index and a stream per
purpose, computed on the model's device), so a distributed evaluation, a single-process
recomputation and the encode job agree.
"""

from __future__ import annotations

import numpy as np
import torch

from vaedist.likelihoods import bits_per_dim
from vaedist.losses import importance_log_px, negative_elbo_given_posterior
from vaedist.rng import STREAM_IW, STREAM_MC, STREAM_Z, keyed_normal


@torch.no_grad()
def evaluate_batch(model, x: torch.Tensor, indices, split: str, seed: int, num_samples_mc: int = 1,
                   num_samples_iw: int = 0, iw_chunk_size: int = 100) -> dict[str, torch.Tensor]:
    """Per-datapoint results for x [B, P] (the likelihood's eval_input): mu, logvar, z (one posterior sample),
    recon_nll, kl, loss (= recon_nll + kl), bpd (loss in bits per sub-pixel) and, when num_samples_iw > 0,
    log_px, gap (= log_px + loss) and bpd_iw (-log_px in bits per sub-pixel)."""
    latent_dim = model.latent_dim
    index = torch.as_tensor(np.asarray(indices), dtype=torch.int64).to(x.device)

    def noise(stream: int, num_samples: int, first_sample: int = 0) -> torch.Tensor:
        return keyed_normal(index, seed=seed, split=split, stream=stream, num_samples=num_samples, dim=latent_dim,
                            first_sample=first_sample)

    mu, logvar = model.encode(x)  # once: the ELBO, z and the importance weights all reuse it
    parts = negative_elbo_given_posterior(model, x, mu, logvar, noise(STREAM_MC, num_samples_mc))
    eps_z = noise(STREAM_Z, 1)[:, 0]
    # float64 sums, so that loss == recon_nll + kl and gap == log_px + loss hold exactly in the table.
    recon_nll, kl = parts.recon_nll.double(), parts.kl.double()
    out = {
        "mu": mu.float(), "logvar": logvar.float(),
        "z": (mu + torch.exp(0.5 * logvar) * eps_z).float(),
        "recon_nll": recon_nll, "kl": kl, "loss": recon_nll + kl,
    }
    out["bpd"] = bits_per_dim(out["loss"], x.shape[-1])
    if num_samples_iw > 0:
        # Drawn a chunk at a time, as the estimate consumes it: K x D noise is never held at once.
        log_px = importance_log_px(model, x, num_samples_iw, chunk_size=iw_chunk_size,
                                   eps=lambda start, k: noise(STREAM_IW, k, start), posterior=(mu, logvar)).double()
        out["log_px"] = log_px
        out["gap"] = log_px + out["loss"]
        out["bpd_iw"] = bits_per_dim(-log_px, x.shape[-1])
    return out
