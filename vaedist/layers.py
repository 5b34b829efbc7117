"""Building blocks the model families share (vaedist/model.py, vaedist/hierarchical.py). Torch only."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "softplus": nn.Softplus, "tanh": nn.Tanh}


def mlp(widths: list[int], activation: str) -> nn.Sequential:
    """Linear layers between consecutive widths, each followed by the activation."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Linear(w_in, w_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)
