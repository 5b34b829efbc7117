"""Per-datapoint randomness, the old CPU code against vaedist.rng, one thread, old and new calls
interleaved in one process (so both see the same machine).

    python benchmarks/noise.py --rows 128 --repeats 20 --encode

(1) keyed noise [rows, S, 50] at S = 16 (the MC samples' order of size) and K = 1000 (importance
    sampling): per_key_normal below, the scheme before rng (a torch.Generator re-seeded per row in a
    Python loop, on the CPU; latent tables without a noise_scheme in their lineage used it) vs
    rng.keyed_normal (counter-based, vectorised);
(2) fixed binarisation of [rows, 784] images (and of 2048, the GPU encode batch): data.binarize.fixed_binarize
    (NumPy) vs rng.fixed_binarize.
Each line gives rows/s of the best call of each side and new/old; the median call's ratio follows.
Where CUDA is available it also times rng.keyed_normal on the GPU (its old counterpart runs on the CPU).
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Callable

import numpy as np
import torch

LATENT_DIM = 50
NUM_PIXELS = 784
ENCODE_BATCH = 2048  # configs/gpu-cluster.yaml's encode.batch_size


def per_key_normal(indices: np.ndarray, split: str, seed: int, stream: int, num_samples: int, dim: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The baseline: standard normal noise [B, num_samples, dim], row i from its own torch.Generator
    seeded with ((seed * 1_000_003 + split id) * 100_000_007 + index) * 8 + stream (mod 2**63)."""
    split_id = {"train": 0, "test": 1}[split]
    gen = torch.Generator()
    rows = []
    for index in np.asarray(indices).tolist():
        gen.manual_seed((((seed * 1_000_003 + split_id) * 100_000_007 + int(index)) * 8 + stream) & (2**63 - 1))
        rows.append(torch.randn(num_samples, dim, generator=gen, dtype=dtype))
    return torch.stack(rows) if rows else torch.empty(0, num_samples, dim, dtype=dtype)


def _interleaved(old: Callable[[], object], new: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per call of each, alternating old and new after one warm-up call each."""
    old(), new()
    times_old, times_new = [], []
    for _ in range(repeats):
        for fn, times in ((old, times_old), (new, times_new)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times_old, times_new


def _report(echo, label: str, rows: int, old_name: str, new_name: str, times_old, times_new) -> dict[str, float]:
    old_rate, new_rate = rows / min(times_old), rows / min(times_new)
    median_ratio = statistics.median(times_old) / statistics.median(times_new)
    echo(f"{label}: {old_name} {old_rate:,.0f} rows/s, {new_name} {new_rate:,.0f} rows/s, "
         f"ratio new/old {new_rate / old_rate:.2f} (best of {len(times_old)}; median {median_ratio:.2f})")
    return {"old_rows_per_s": old_rate, "new_rows_per_s": new_rate, "ratio": new_rate / old_rate,
            "median_ratio": median_ratio}


def bench_noise(echo: Callable[[str], None] = print, rows: int = 128, repeats: int = 20) -> dict[str, dict]:
    from vaedist import rng
    from vaedist.data import binarize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    try:
        echo(f"one CPU thread, {rows} rows per call, {repeats} calls per side, interleaved; "
             f"scheme {rng.NOISE_SCHEME}")
        index_np = np.arange(rows) + 1000
        index = torch.from_numpy(index_np)
        for samples in (16, 1000):
            times = _interleaved(
                partial(per_key_normal, index_np, "test", 0, 1, samples, LATENT_DIM),
                partial(rng.keyed_normal, index, seed=0, split="test", stream=1, num_samples=samples,
                        dim=LATENT_DIM),
                repeats)
            results[f"normal_S{samples}"] = _report(echo, f"noise S={samples}, D={LATENT_DIM}", rows,
                                                    "per_key_normal", "keyed_normal", *times)
        # Also at the GPU encode job's batch size, where the NumPy version's temporaries leave the cache.
        for batch in sorted({rows, ENCODE_BATCH}):
            images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0))
            batch_index = torch.arange(batch) + 1000
            times = _interleaved(partial(binarize.fixed_binarize, images, batch_index, "test", 0),
                                 partial(rng.fixed_binarize, images, batch_index, "test", 0), repeats)
            results[f"binarize_B{batch}"] = _report(echo, f"fixed_binarize P={NUM_PIXELS}, {batch} rows", batch,
                                                    "NumPy", "torch", *times)
    finally:
        torch.set_num_threads(threads)

    if torch.cuda.is_available():
        index_gpu = index.cuda()

        def gpu_call() -> None:
            rng.keyed_normal(index_gpu, seed=0, split="test", stream=1, num_samples=1000, dim=LATENT_DIM)
            torch.cuda.synchronize()

        gpu_call()
        best = min(_timed(gpu_call) for _ in range(repeats))
        old_rate = results["normal_S1000"]["old_rows_per_s"]
        echo(f"noise S=1000 on {torch.cuda.get_device_name()}: keyed_normal {rows / best:,.0f} rows/s, "
             f"{rows / best / old_rate:.1f} x per_key_normal on one CPU thread")
        results["normal_S1000_cuda"] = {"new_rows_per_s": rows / best, "ratio": rows / best / old_rate}
    return results


@torch.no_grad()
def legacy_evaluate_batch(model, x: torch.Tensor, indices, split: str, seed: int, num_samples_mc: int = 1,
                          num_samples_iw: int = 0, iw_chunk_size: int = 100) -> dict[str, torch.Tensor]:
    """evaluate_batch as it was before vaedist.rng: per_key_normal's per-row noise on the CPU, copied
    over, and the encoder run three times per row (here, in negative_elbo, in importance_log_px)."""
    from vaedist.losses import negative_elbo

    dim, device = model.latent_dim, x.device
    mu, logvar = model.encode(x)
    parts = negative_elbo(model, x, num_samples_mc,
                          eps=per_key_normal(indices, split, seed, 0, num_samples_mc, dim).to(device))
    eps_z = per_key_normal(indices, split, seed, 2, 1, dim).to(device)[:, 0]
    out = {"mu": mu, "logvar": logvar, "z": mu + torch.exp(0.5 * logvar) * eps_z,
           "recon_nll": parts.recon_nll.double(), "kl": parts.kl.double(), "loss": parts.loss.double()}
    if num_samples_iw > 0:
        from vaedist.losses import importance_log_px

        eps_iw = per_key_normal(indices, split, seed, 1, num_samples_iw, dim).to(device)
        out["log_px"] = importance_log_px(model, x, num_samples_iw, chunk_size=iw_chunk_size, eps=eps_iw).double()
    return out


def bench_evaluate(echo: Callable[[str], None] = print, rows: int = 128, batches: int = 8,
                   threads: int = 1) -> dict[str, dict]:
    """Encode rows/s, the job's per-batch work (an actor's evaluate_batch on a 784-512-512-50 MLP),
    before (legacy_evaluate_batch) and after (evaluate.evaluate_batch), interleaved, at S = 16, K = 0
    and at S = 1, K = 1000."""
    from vaedist.config import ModelConfig
    from vaedist.evaluate import evaluate_batch
    from vaedist.model import VAE

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = VAE(ModelConfig(latent_dim=LATENT_DIM, hidden_dims=[512, 512])).eval()
    x = torch.bernoulli(torch.full((rows, NUM_PIXELS), 0.2), generator=torch.Generator().manual_seed(0))
    index = np.arange(rows) + 1000
    results = {}
    try:
        for mc, iw, reps in ((16, 0, batches), (1, 1000, max(2, batches // 4))):
            def run(fn):
                return lambda: fn(model, x, index, "test", 0, mc, iw, 100)
            times = _interleaved(run(legacy_evaluate_batch), run(evaluate_batch), reps)
            results[f"encode_S{mc}_K{iw}"] = _report(echo, f"encode work S={mc}, K={iw}, {threads} thread(s)", rows,
                                                     "before", "after", *times)
    finally:
        torch.set_num_threads(saved)
    return results


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="Datapoints per call.")
    parser.add_argument("--repeats", type=int, default=20,
                        help="Timed calls per side, old and new interleaved; rows/s of the best call.")
    parser.add_argument("--encode", action="store_true", help="Also time an encode actor's whole per-batch work "
                                                              "before and after (S=16 K=0, S=1 K=1000).")
    args = parser.parse_args(argv)
    bench_noise(rows=args.rows, repeats=args.repeats)
    if args.encode:
        bench_evaluate(rows=args.rows)


if __name__ == "__main__":
    main()
