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

import functools
import operator

import numpy as np
import torch

from vaedist.likelihoods import bits_per_dim
from vaedist.losses import importance_log_px, posterior_of
from vaedist.rng import STREAM_IW, STREAM_MC, STREAM_Z, keyed_normal


@torch.no_grad()
def evaluate_batch(model, x: torch.Tensor, indices, split: str, seed: int, num_samples_mc: int = 1,
                   num_samples_iw: int = 0, iw_chunk_size: int = 100, kl_per_dim: bool = False
                   ) -> dict[str, torch.Tensor]:
    """Per-datapoint results for x [B, P] (the likelihood's eval_input): mu, logvar, z (one posterior sample),
    recon_nll, kl, kl_groups ([B, L]: each latent group's term, kl their sum), loss (= recon_nll + kl),
    bpd (loss in bits per sub-pixel) and, when num_samples_iw > 0, log_px, gap (= log_px + loss) and
    bpd_iw (-log_px in bits per sub-pixel). With several latent groups mu, logvar and z hold every
    group's, z_1 first (the model's encode and posterior say how). kl_per_dim adds kl_dims [B, D],
    each dimension's KL term (averaged over the S samples where it depends on them)."""
    latent_dim = model.latent_dim
    index = torch.as_tensor(np.asarray(indices), dtype=torch.int64).to(x.device)

    def noise(stream: int, num_samples: int, first_sample: int = 0) -> torch.Tensor:
        return keyed_normal(index, seed=seed, split=split, stream=stream, num_samples=num_samples, dim=latent_dim,
                            first_sample=first_sample)

    posterior = posterior_of(model, x)  # once: the ELBO, z and the importance weights all reuse it
    terms = posterior.terms(noise(STREAM_MC, num_samples_mc))
    parts = terms.parts()
    eps_z = noise(STREAM_Z, 1)[:, 0]
    # float64 sums, so that kl == kl_1 + ... + kl_L (left to right), loss == recon_nll + kl and
    # gap == log_px + loss hold exactly in the table. One group: kl is its one term, unchanged.
    recon_nll, kl_groups = parts.recon_nll.double(), parts.kl_groups.double()
    kl = functools.reduce(operator.add, kl_groups.unbind(dim=-1))
    out = {
        "mu": posterior.mu.float(), "logvar": posterior.logvar.float(),
        "z": posterior.sample(eps_z).float(),
        "recon_nll": recon_nll, "kl": kl, "kl_groups": kl_groups, "loss": recon_nll + kl,
    }
    if kl_per_dim:
        out["kl_dims"] = terms.kl_per_dim().float()
    out["bpd"] = bits_per_dim(out["loss"], x.shape[-1])
    if num_samples_iw > 0:
        # Drawn a chunk at a time, as the estimate consumes it: K x D noise is never held at once.
        log_px = importance_log_px(model, x, num_samples_iw, chunk_size=iw_chunk_size,
                                   eps=lambda start, k: noise(STREAM_IW, k, start), posterior=posterior).double()
        out["log_px"] = log_px
        out["gap"] = log_px + out["loss"]
        out["bpd_iw"] = bits_per_dim(-log_px, x.shape[-1])
    return out
