"""Which device a process computes on, and a loud error where CUDA is asked for but unusable. Torch only.

torch 2.14.1's default wheels are CUDA 13 builds, which need an NVIDIA driver of the R580 series or
newer; with an older driver torch.cuda.is_available() is simply false. A training worker would then
crash at its first copy with a confusing message, and an encode actor would quietly compute on the
CPU while holding a GPU: both call require_cuda instead.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

CUDA13_MIN_DRIVER = "580"


class CudaUnavailableError(RuntimeError):
    """A GPU was asked for and CUDA cannot be used; the message names torch's CUDA build and the driver."""


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version, or None where there is none."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        for word in proc.read_text(errors="replace").split():
            if word[:1].isdigit() and "." in word:
                return word
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def require_cuda(what: str) -> torch.device:
    """The current CUDA device, or CudaUnavailableError saying why there is none and what to do."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    driver = nvidia_driver_version()
    build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} (NVIDIA driver {CUDA13_MIN_DRIVER} "
             "or newer)" if torch.version.cuda else f"torch {torch.__version__} is a CPU-only build")
    found = f"the NVIDIA driver here is {driver}" if driver else "no NVIDIA driver was found"
    raise CudaUnavailableError(f"{what} asked for a GPU, but CUDA is not usable: {build}, {found}. Install a torch "
                               "build for this driver (docs/guides/clusters.md, 'GPUs'), or set the use_gpu key to false")
