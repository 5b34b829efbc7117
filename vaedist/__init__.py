"""vaedist: distributed batch training and evaluation of variational autoencoders on Ray.

    import vaedist
    model = vaedist.load_model("outputs/runs/debug")          # a trained model on images
    table = vaedist.open_table("outputs/latents-debug")       # a latent table and its lineage
    from vaedist import api                                    # the pipeline's steps: api.train(cfg), ...

The names below are imported on first use (vaedist.api), so `import vaedist` loads neither torch,
DuckDB nor Ray.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "vaedist.api", "open_table": "vaedist.api", "read_images": "vaedist.api",
    "Model": "vaedist.api", "Table": "vaedist.api", "Images": "vaedist.api",
    "Config": "vaedist.config", "load_config": "vaedist.config", "ConfigError": "vaedist.config",
}

_SUBMODULES = ("analyses", "api")  # `vaedist.analyses.ANALYSES` works without importing it first

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"vaedist.{name}")
    raise AttributeError(f"module 'vaedist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
