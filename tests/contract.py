"""The determinism contract's tolerances (docs/concepts/determinism.md), shared by the tests that
compare numbers computed under different kernels or thread counts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

# torch's CPU capability levels on x86, lowest first, and what oneDNN and MKL call the same cap.
LEVELS = ["default", "avx2", "avx512"]
ONEDNN = {"default": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE"}
MKL = {"default": "SSE4_2", "avx2": "AVX2", "avx512": "AVX512"}

# float32 evaluation: a per-datapoint sum over 784 pixels and layers of a few hundred units, summed
# in another order, moves by a few ulps times sqrt(terms): well under 1e-5 relative. The gap is a
# difference of two ~100-nat numbers, so its tolerance is absolute, at the loss's scale.
# kl_groups and kl_dims are kl's terms (per latent group, per dimension): kl's tolerance.
EVAL_RTOL = {"mu": 1e-4, "logvar": 1e-4, "z": 1e-4, "recon_nll": 1e-5, "kl": 1e-4, "kl_groups": 1e-4,
             "kl_dims": 1e-4, "loss": 1e-5, "bpd": 1e-5, "log_px": 1e-5, "bpd_iw": 1e-5, "gap": 0.0}
EVAL_ATOL = {"mu": 1e-5, "logvar": 1e-5, "z": 1e-5, "kl": 1e-5, "kl_groups": 1e-5, "kl_dims": 1e-5, "gap": 2e-3}
# Keyed noise: exact integer hashing, then log, sqrt and tan, whose vectorised kernels differ by an
# ulp or so between instruction sets; |eps| <= 5.77, where an ulp is at most 4.8e-7.
NOISE_ATOL = 4e-6
# Four Adam steps from the same weights: each step moves a weight by about lr (1e-3) whatever the
# gradient's size, so a rounding difference in a near-zero gradient can flip a step's sign.
TRAINED_ATOL = 2.5e-3


def own_level() -> str:
    return torch.backends.cpu.get_cpu_capability().lower()


def lower_level() -> str | None:
    """The level just below this CPU's: an AVX-512 machine computes as an AVX2 one does, and an AVX2
    machine as one without AVX2 (a lower level is always available; a higher one never is)."""
    own = own_level()
    return LEVELS[LEVELS.index(own) - 1] if own in LEVELS[1:] else None


def level_env(level: str) -> dict[str, str]:
    """Environment variables that make a new process's torch, oneDNN and MKL use `level`'s kernels
    (read when torch is imported)."""
    return {"ATEN_CPU_CAPABILITY": level, "ONEDNN_MAX_CPU_ISA": ONEDNN[level], "MKL_ENABLE_INSTRUCTIONS": MKL[level]}


def assert_tables_close(got: pa.Table, want: pa.Table) -> None:
    """Two latent tables of the same rows (sorted alike): every column exact but the evaluation's
    float columns, which agree within the contract's tolerances."""
    assert got.column_names == want.column_names and got.num_rows == want.num_rows
    for name in got.column_names:
        base = "mu" if name.startswith("mu") else "logvar" if name.startswith("logvar") else name
        if base in EVAL_RTOL:
            a, b = (np.asarray(t.column(name).to_pylist(), dtype=np.float64) for t in (got, want))
            np.testing.assert_allclose(a, b, rtol=EVAL_RTOL[base], atol=EVAL_ATOL.get(base, 0.0), err_msg=name)
        else:
            assert got.column(name).equals(want.column(name)), name
