"""What the determinism contract (docs/concepts/determinism.md) is about, computed in a fresh process:
tests/unit/test_determinism.py runs it under several kernel choices (ATEN_CPU_CAPABILITY, and oneDNN's
and MKL's ISA caps, which must be set before torch is imported) and thread counts, and compares.

    python tests/determinism_probe.py OUT.npz SHARDS CHECKPOINT [CHECKPOINT ...]

For each checkpoint and each thread count in VAEDIST_PROBE_THREADS (default "1,2") it writes:
the likelihood's evaluation input and the keyed noise (promised bit-identical everywhere), the
per-datapoint evaluation (mu, logvar, z, recon_nll, kl, loss, log_px, gap: bit-identical only under
the same kernels, thread count and batching), the same rows evaluated in other batches and the weights after a few optimiser steps from the checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from vaedist.checkpoint import load_model
from vaedist.config import TrainConfig
from vaedist.data import load_split_arrays, read_manifest
from vaedist.engine import make_optimizer, train_steps
from vaedist.evaluate import evaluate_batch
from vaedist.rng import STREAM_MC, keyed_normal

ROWS = 256


def probe(shards: str, checkpoints: list[str], threads: list[int]) -> dict[str, np.ndarray]:
    entry = read_manifest(shards).split("test").shards[0]
    indices, images, _ = load_split_arrays([str(Path(shards, entry.path))])
    indices, images = indices[:ROWS], images[:ROWS]
    out = {"capability": np.array(torch.backends.cpu.get_cpu_capability())}
    for c, checkpoint in enumerate(checkpoints):
        for n in threads:
            torch.set_num_threads(n)
            model, cfg, _ = load_model(checkpoint)
            model.eval()
            x = model.likelihood.eval_input(images, indices, "test", cfg.train.seed, torch.device("cpu"))
            key = f"{c}/{n}"
            out[f"{key}/input"] = x.numpy()
            out[f"{key}/noise"] = keyed_normal(torch.as_tensor(indices), seed=7, split="test", stream=STREAM_MC,
                                               num_samples=3, dim=model.latent_dim).numpy()
            for name, value in evaluate_batch(model, x, indices, "test", seed=7, num_samples_mc=2,
                                              num_samples_iw=8, iw_chunk_size=4).items():
                out[f"{key}/eval/{name}"] = value.numpy()
            # The same rows in other batches: a row's numbers depend on its batch's size (kernel choice).
            parts = [evaluate_batch(model, x[a:b], indices[a:b], "test", seed=7, num_samples_mc=2, num_samples_iw=8,
                                    iw_chunk_size=4) for a, b in ((0, 1), (1, 37), (37, ROWS))]
            for name in parts[0]:
                out[f"{key}/rebatched/{name}"] = torch.cat([p[name] for p in parts]).numpy()
            train = TrainConfig(batch_size_per_worker=64, lr=1e-3, seed=3)
            optimizer = make_optimizer(model, train, torch.device("cpu"))
            train_steps(model, optimizer, torch.as_tensor(images.reshape(len(images), -1)), train, epoch=0, rank=0,
                        num_steps=4, steps_per_epoch=4, start_step=0, device=torch.device("cpu"))
            out[f"{key}/trained"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    return out


if __name__ == "__main__":
    path, shards, *checkpoints = sys.argv[1:]
    threads = [int(t) for t in os.environ.get("VAEDIST_PROBE_THREADS", "1,2").split(",")]
    np.savez(path, **probe(shards, checkpoints, threads))
