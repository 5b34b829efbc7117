"""The names of vaedist's pluggable parts, each listed once. Standard library only, so that the
config (its types and checks) and the CLI (its choices) derive theirs from here without importing
torch; each registry of objects (likelihoods.LIKELIHOODS, objectives.OBJECTIVES, the external
sources below) is checked against its list when it is built, so a name cannot be added in one place
and forgotten in another.

A new likelihood, objective or data source is one entry here plus its class.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable, Mapping

LIKELIHOODS: tuple[str, ...] = ("bernoulli", "discretized-logistic", "discretized-logistic-mixture", "gaussian")
"""model.likelihood: the decoder's distributions p(x|z) (vaedist/likelihoods.py)."""
BINARISED_LIKELIHOODS: frozenset[str] = frozenset({"bernoulli"})
"""The likelihoods whose input is binarised draws (the object's `binarised`); the rest model the
8-bit levels. The config checks data.binarize against it before torch is imported."""

OBJECTIVES: dict[str, str | None] = {"elbo": None, "beta": "beta", "iwae": "iwae_samples", "free-bits": "free_bits"}
"""train.objective -> the train.* setting only that objective uses (and requires), if any
(vaedist/objectives.py)."""

EXTERNAL_SOURCES: dict[str, str] = {
    "images": "vaedist.data.external.folder:ImageFolderSource",
    "webdataset": "vaedist.data.external.webdataset:WebDatasetSource",
    "arrays": "vaedist.data.external.arrays:ArraySource",
}
"""data.source kinds that read your own data -> their source class (imported on use)."""
DATA_SOURCES: tuple[str, ...] = ("builtin", *EXTERNAL_SOURCES)
"""data.source: builtin (data.dataset) or one of the external sources."""


def check_registry(what: str, registry: Mapping[str, Any], names: Iterable[str]) -> None:
    """Refuse a registry whose names are not exactly the list's (a programming error, at import)."""
    names = list(names)
    if list(registry) != names:
        raise RuntimeError(f"{what}: the registry holds {list(registry)} but vaedist.registry lists {names}; "
                           "add the name to both")


def source_class(kind: str) -> Any:
    """The class of an external data source (data.source), imported now."""
    if kind not in EXTERNAL_SOURCES:
        raise ValueError(f"data.source {kind!r} is not an external source ({', '.join(EXTERNAL_SOURCES)})")
    module, name = EXTERNAL_SOURCES[kind].split(":")
    return getattr(importlib.import_module(module), name)
