"""The determinism contract (docs/concepts/determinism.md), each promise with its comparator.

tests/determinism_probe.py computes the contract's quantities in a fresh process; here it runs under
this machine's own kernels and under the instruction-set level below them (ATEN_CPU_CAPABILITY, with
oneDNN's and MKL's caps to match), each at 1 and 2 threads. So an AVX-512 machine also computes as an
AVX2 one does, and an AVX2 machine as one without AVX2, and each checks:
    exact  - keyed inputs (binarisation, 8-bit scaling) under any kernels and thread count;
    exact  - keyed noise for any thread count; within a few ulps across instruction sets;
    exact  - every number, for the same kernels and thread count (two fresh processes);
    close  - evaluation and a few training steps, across thread counts, batchings and instruction sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vaedist.checkpoint import save_checkpoint
from vaedist.config import Config, ModelConfig
from vaedist.data import manifest_hash
from vaedist.model import VAE

from conftest import REPO
from contract import (EVAL_ATOL, EVAL_RTOL, NOISE_ATOL, TRAINED_ATOL, level_env, lower_level,
                      own_level)

@pytest.fixture(scope="module")
def checkpoints(latent_tables, tmp_path_factory) -> list[str]:
    """The MLP table's checkpoint (Bernoulli) and a small conv model with the logistic mixture (its
    convolutions go through oneDNN, whose kernels depend on the instruction set)."""
    root = tmp_path_factory.mktemp("determinism")
    torch.manual_seed(1)
    cfg = Config(model=ModelConfig(kind="conv", latent_dim=4, hidden_dims=[8, 16],
                                   likelihood="discretized-logistic-mixture", mixture_components=3))
    conv = str(root / "conv")
    save_checkpoint(conv, model_state=VAE(cfg.model).state_dict(), optimizer_state=None, epoch=1, global_step=0,
                    config=cfg, manifest_hash=manifest_hash(latent_tables["shards"]), history=[])
    return [latent_tables["checkpoint"], conv]


def run_probe(out: Path, shards: str, checkpoints: list[str], level: str | None) -> dict[str, np.ndarray]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"),
                                                                     os.environ.get("PYTHONPATH")]))}
    if level is not None:
        env.update(level_env(level))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "determinism_probe.py"), str(out), shards,
                           *checkpoints], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(out) as f:
        return dict(f)


@pytest.fixture(scope="module")
def probes(checkpoints, latent_tables, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """{"own", "own-again" and the lower level: the probe's arrays}, the processes run two at a time."""
    root = tmp_path_factory.mktemp("probes")
    runs = {"own": None, "own-again": None, **({lower_level(): lower_level()} if lower_level() else {})}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_probe, root / f"{name}.npz", latent_tables["shards"], checkpoints, level)
                   for name, level in runs.items()}
        return {name: f.result() for name, f in futures.items()}


def keys(probe: dict, kind: str) -> list[str]:
    return sorted(k for k in probe if f"/{kind}" in k)


def test_a_lower_level_really_changes_the_kernels(probes):
    """The environment variables reach torch: otherwise every cross-level comparison is vacuous."""
    level = lower_level()
    if level is not None:
        assert str(probes[level]["capability"]).lower() == level
    assert str(probes["own"]["capability"]).lower() == own_level()


def test_keyed_inputs_are_bit_identical_under_any_kernels_and_threads(probes):
    """Binarisation and the 8-bit scalings are integer hashing and one correctly rounded division."""
    reference = probes["own"]
    for name, probe in probes.items():
        for key in keys(reference, "input"):
            other = key.replace("/1/", "/2/")  # and the other thread count
            np.testing.assert_array_equal(probe[key], reference[key], err_msg=f"{name} {key}")
            np.testing.assert_array_equal(probe[other], reference[key], err_msg=f"{name} {other}")


def test_keyed_noise_is_bit_identical_for_any_threads_and_within_ulps_across_instruction_sets(probes):
    """Its integer hashing is exact everywhere; its floats go through log, sqrt and tan (NOISE_ATOL)."""
    reference = probes["own"]
    for name, probe in probes.items():
        for key in keys(reference, "noise"):
            other = key.replace("/1/", "/2/")
            np.testing.assert_array_equal(probe[other], probe[key], err_msg=f"{name}: threads changed {key}")
            if name.startswith("own"):
                np.testing.assert_array_equal(probe[key], reference[key], err_msg=f"{name} {key}")
            else:
                np.testing.assert_allclose(probe[key], reference[key], rtol=0, atol=NOISE_ATOL, err_msg=f"{name} {key}")


def test_the_same_kernels_and_threads_give_bit_identical_numbers(probes):
    own, again = probes["own"], probes["own-again"]
    assert sorted(own) == sorted(again)
    for key in own:
        np.testing.assert_array_equal(own[key], again[key], err_msg=key)


def test_other_threads_and_instruction_sets_agree_within_the_stated_tolerance(probes):
    reference = probes["own"]
    for name, probe in probes.items():
        for key in keys(reference, "eval"):
            column = key.rsplit("/", 1)[1]
            for other in (key, key.replace("/1/", "/2/")):
                np.testing.assert_allclose(probe[other], reference[key], rtol=EVAL_RTOL[column],
                                           atol=EVAL_ATOL.get(column, 0.0), err_msg=f"{name} {other}")
        for key in keys(probe, "rebatched"):  # other batch sizes: close to the whole batch's numbers
            column = key.rsplit("/", 1)[1]
            np.testing.assert_allclose(probe[key], reference[key.replace("rebatched", "eval")], rtol=EVAL_RTOL[column],
                                       atol=EVAL_ATOL.get(column, 0.0), err_msg=f"{name} {key}")
        for key in keys(reference, "trained"):
            for other in (key, key.replace("/1/", "/2/")):
                np.testing.assert_allclose(probe[other], reference[key], rtol=0, atol=TRAINED_ATOL,
                                           err_msg=f"{name} {other}")


def test_the_table_identities_hold_exactly_under_every_kernel_choice(probes):
    """loss = recon_nll + kl and gap = log_px + loss are computed in float64 from the float32 terms:
    exact in the table whatever rounded the terms."""
    for name, probe in probes.items():
        for key in keys(probe, "loss"):
            base = key.rsplit("/", 1)[0]
            np.testing.assert_array_equal(probe[key], probe[f"{base}/recon_nll"] + probe[f"{base}/kl"])
            np.testing.assert_array_equal(probe[f"{base}/gap"], probe[f"{base}/log_px"] + probe[key])
