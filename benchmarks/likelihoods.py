"""The likelihoods' share of a training step, and today's MLP/Bernoulli step against the code before
likelihoods existed, in one run. No Ray.

    python benchmarks/likelihoods.py --rounds 5 --steps 20      # from a git clone: it reads the baseline from git

For each likelihood: the MLP of configs/mnist.yaml (784-512-512-50) on 28x28x1 images, batch 128,
one sample of z. "step" is a whole optimiser step (engine.train_step on the likelihood's train_input
of a fresh batch); "log_prob" is the likelihood's log_prob forward and backward alone, on decoder
outputs of the same shape. The baseline is the Bernoulli step of commit 4c04545 (before
vaedist.likelihoods): its model.py and losses.py loaded from git into temporary modules and its
train_step's lines (negative_elbo, batch_loss, backward, Adam), on the same images, weights and noise.
`--encode` measures instead the evaluation encode runs per batch (evaluate.evaluate_batch) of the
colour case: configs/conv.yaml's model on 32x32x3 images with the logistic mixture (K = 10
components, S = 16 samples of z, 32 rows a batch), today's code against the likelihood and model of
commit ENCODE_BASELINE_COMMIT (loaded from git as above, with the same weights), printing rows/s of
each, their ratio, and the largest difference in the per-row columns; then, each in a process of
its own, the peak memory one batch of encode's default 128 rows adds with either code.

Rounds interleave every variant, so a machine shared with other jobs slows all alike; the figures
are medians over rounds of each round's median step time, and ratios are to the baseline's. Both the
wall time and the process's CPU time are taken: on a machine that other jobs load far beyond its
cores, the wall time measures the scheduler, and the CPU time of a single-threaded run (--threads 1,
the default) is the better measure of the work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vaedist.config import ModelConfig, TrainConfig
from vaedist.engine import make_optimizer, train_step
from vaedist.likelihoods import LIKELIHOODS
from vaedist.model import VAE

BASELINE_COMMIT = "4c04545"
MODEL = dict(kind="mlp", latent_dim=50, hidden_dims=[512, 512], activation="elu")
BATCH, SHAPE = 128, (28, 28, 1)


def _old_module(name: str, path: str, commit: str, tmp: Path):
    """vaedist/<path> as of `commit`, imported as a module of its own (its imports are the current
    package's: config for model.py, torch only for losses.py)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout
    file = tmp / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _images(steps: int, gen: torch.Generator) -> torch.Tensor:
    """MNIST-like uint8 batches: mostly 0, some 255, a few grey levels (the speed does not depend on
    which; binarisation and the 8-bit likelihoods see the same bytes)."""
    u = torch.rand(steps, BATCH, 784, generator=gen)
    return torch.where(u < 0.8, 0, torch.where(u < 0.9, 255, (u * 2550) % 256)).to(torch.uint8)


ENCODE_BASELINE_COMMIT = "0455a0f"
ENCODE_MODEL = dict(kind="conv", latent_dim=32, hidden_dims=[32, 64], res_blocks_per_stage=1, norm="group",
                    activation="elu", likelihood="discretized-logistic-mixture", mixture_components=10)
ENCODE_SHAPE, ENCODE_ROWS, ENCODE_SAMPLES = (32, 32, 3), 32, 16


ENCODE_MEMORY_ROWS = 128  # encode.batch_size's default


def _encode_models():
    """(today's model, the baseline's with the same weights) of ENCODE_MODEL."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(**ENCODE_MODEL), image_shape=ENCODE_SHAPE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        old_lik = _old_module("_vaedist_old_likelihoods", "vaedist/likelihoods.py", ENCODE_BASELINE_COMMIT, Path(tmp))
        old_model_module = _old_module("_vaedist_old_conv_model", "vaedist/model.py", ENCODE_BASELINE_COMMIT, Path(tmp))
        old_model = old_model_module.VAE(model.cfg, image_shape=ENCODE_SHAPE,
                                         likelihood=old_lik.get_likelihood(model.cfg, ENCODE_SHAPE[2])).eval()
    old_model.load_state_dict(model.state_dict())
    return model, old_model


def _encode_batch(model, rows: int):
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (rows, math.prod(ENCODE_SHAPE)), generator=gen, dtype=torch.uint8)
    indices = np.arange(rows)
    return model.likelihood.eval_input(images, indices, "test", 0, torch.device("cpu")), indices


def encode_peak(which: str) -> None:
    """One evaluate_batch of ENCODE_MEMORY_ROWS rows with `which` code (before: the baseline's), in a
    process of its own: prints the peak resident memory it added, in MiB. Read from /proc's VmHWM, the
    high-water mark of this process's own memory (ru_maxrss would carry the parent's across the exec)."""
    from vaedist.evaluate import evaluate_batch

    def high_water_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status: the memory figure needs Linux")

    model, old_model = _encode_models()
    chosen = old_model if which == "before" else model
    x, indices = _encode_batch(chosen, ENCODE_MEMORY_ROWS)
    base = high_water_mib()
    evaluate_batch(chosen, x, indices, "test", 0, ENCODE_SAMPLES)
    print(json.dumps({"added_mib": high_water_mib() - base}))


def encode_main(args) -> dict[str, float]:
    """evaluate_batch of the colour mixture, today's code against ENCODE_BASELINE_COMMIT's (module doc)."""
    from vaedist.evaluate import evaluate_batch

    model, old_model = _encode_models()
    x, indices = _encode_batch(model, ENCODE_ROWS)
    variants = {f"evaluate @{ENCODE_BASELINE_COMMIT}": old_model, "evaluate (this tree)": model}
    outs = {k: evaluate_batch(m, x, indices, "test", 0, ENCODE_SAMPLES) for k, m in variants.items()}
    base, new = outs.values()
    diffs = {col: float((new[col] - base[col]).abs().max()) for col in ("recon_nll", "kl", "loss")}
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {clock: {k: [] for k in variants} for clock in clocks}
    for _ in range(args.rounds):
        for key, m in variants.items():  # interleaved: a load on the machine slows both alike
            start = {clock: read() for clock, read in clocks.items()}
            evaluate_batch(m, x, indices, "test", 0, ENCODE_SAMPLES)
            for clock, read in clocks.items():
                times[clock][key].append(read() - start[clock])
    results: dict[str, float] = {f"max_abs_diff_{col}": d for col, d in diffs.items()}
    print(f"evaluate_batch, {ENCODE_ROWS} rows of {'x'.join(map(str, ENCODE_SHAPE))}, mixture K = "
          f"{ENCODE_MODEL['mixture_components']}, S = {ENCODE_SAMPLES}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds")
    for clock in clocks:
        med = {k: statistics.median(v) for k, v in times[clock].items()}
        (old_key, old_s), (new_key, new_s) = med.items()
        results[f"{clock}_rows_per_s_before"] = ENCODE_ROWS / old_s
        results[f"{clock}_rows_per_s_after"] = ENCODE_ROWS / new_s
        results[f"{clock}_speedup"] = old_s / new_s
        print(f"{clock:>5}: {old_key} {ENCODE_ROWS / old_s:7.2f} rows/s, {new_key} {ENCODE_ROWS / new_s:7.2f} "
              f"rows/s, ratio {old_s / new_s:.2f}x")
    print("largest |difference| per row: " + ", ".join(f"{c} {d:.3g} nats" for c, d in diffs.items()))
    for which in ("before", "after"):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--encode-peak", which],
                              check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        results[f"peak_mib_{which}"] = json.loads(proc.stdout.strip().splitlines()[-1])["added_mib"]
    print(f"memory one evaluate_batch of {ENCODE_MEMORY_ROWS} rows adds at its peak: "
          f"{results['peak_mib_before']:,.0f} MiB before, {results['peak_mib_after']:,.0f} MiB after")
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encode", action="store_true",
                        help="time the colour mixture's evaluation per batch instead (module doc)")
    parser.add_argument("--encode-peak", choices=("before", "after"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.encode_peak:
        return encode_peak(args.encode_peak)
    if args.encode:
        return encode_main(args)
    cfg = TrainConfig(batch_size_per_worker=BATCH)
    gen = torch.Generator().manual_seed(0)
    images = _images(args.steps, gen)

    with tempfile.TemporaryDirectory() as tmp:
        old_model = _old_module("_vaedist_old_model", "vaedist/model.py", BASELINE_COMMIT, Path(tmp))
        old_losses = _old_module("_vaedist_old_losses", "vaedist/losses.py", BASELINE_COMMIT, Path(tmp))
        old_binarize = _old_module("_vaedist_old_binarize", "vaedist/data/binarize.py", BASELINE_COMMIT, Path(tmp))

        torch.manual_seed(0)
        baseline = old_model.VAE(ModelConfig(**MODEL))
        baseline_opt = make_optimizer(baseline, cfg, torch.device("cpu"))

        def old_step(batch: torch.Tensor, step_gen: torch.Generator) -> None:
            x = old_binarize.dynamic_binarize(batch, step_gen)
            parts = old_losses.negative_elbo(baseline, x, 1, generator=step_gen)
            objective = old_losses.batch_loss(parts, 1.0)
            baseline_opt.zero_grad(set_to_none=True)
            objective.backward()
            baseline_opt.step()

        variants = {"bernoulli@" + BASELINE_COMMIT: old_step}
        log_prob_variants = {}
        for name in LIKELIHOODS:
            torch.manual_seed(0)
            model = VAE(ModelConfig(**MODEL, likelihood=name))
            opt = make_optimizer(model, cfg, torch.device("cpu"))

            def step(batch, step_gen, model=model, opt=opt):
                x = model.likelihood.train_input(batch, step_gen)
                train_step(model, opt, x, cfg, 1e-4, 1.0, step_gen)

            def log_prob(batch, step_gen, model=model):
                x = model.likelihood.train_input(batch, step_gen)
                params = torch.randn(BATCH, 1, model.num_params, generator=step_gen).requires_grad_()
                model.likelihood.log_prob(params, x.unsqueeze(1)).sum().backward()

            variants[name] = step
            log_prob_variants[name] = log_prob

        every = {**{f"step {k}": v for k, v in variants.items()},
                 **{f"log_prob {k}": v for k, v in log_prob_variants.items()}}
        clocks = {"wall": time.perf_counter, "cpu": time.process_time}
        times = {clock: {k: [] for k in every} for clock in clocks}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for key, fn in every.items():
                step_gen = torch.Generator().manual_seed(round_)
                per_step = {clock: [] for clock in clocks}
                for batch in images:
                    start = {clock: read() for clock, read in clocks.items()}
                    fn(batch, step_gen)
                    for clock, read in clocks.items():
                        per_step[clock].append(read() - start[clock])
                if round_:
                    for clock in clocks:
                        times[clock][key].append(statistics.median(per_step[clock]))

    results: dict[str, dict[str, float]] = {}
    for clock in clocks:
        med = {k: statistics.median(v) for k, v in times[clock].items()}
        base = med[f"step bernoulli@{BASELINE_COMMIT}"]
        print(f"\n{clock} time, {args.threads} thread(s), batch {BATCH}, median of {args.rounds} rounds x "
              f"{args.steps} steps")
        print(f"{'variant':<40} {'ms/step':>8} {'vs base':>8} {'log_prob ms':>12} {'share':>6}")
        print(f"{'step bernoulli @' + BASELINE_COMMIT + ' (baseline)':<40} {base * 1e3:8.2f} {1.0:8.3f}")
        for name in LIKELIHOODS:
            step_s, lp_s = med[f"step {name}"], med[f"log_prob {name}"]
            results[f"{clock} {name}"] = {"step_ms": step_s * 1e3, "vs_baseline": step_s / base,
                                          "log_prob_ms": lp_s * 1e3, "share": lp_s / step_s}
            print(f"{'step ' + name:<40} {step_s * 1e3:8.2f} {step_s / base:8.3f} {lp_s * 1e3:12.2f} "
                  f"{lp_s / step_s:6.1%}")
    return results


if __name__ == "__main__":
    main()
