"""Your own encoder and decoder (`model.kind: custom`): the factory protocol, importing the factory,
and the checks it passes on one batch before any cluster work. Torch only (shipping the code to Ray's
workers is vaedist/user_code.py's).

    model:
      kind: custom
      factory: toyvae.model:build          # package.module:function
      kwargs: {channels: 32}               # plain YAML values, passed on as keyword arguments

The protocol. vaedist calls

    factory(image_shape=(H, W, C), latent_dim=D, params_per_pixel=K, **model.kwargs)

and expects an `nn.Module` with

    encode(x) -> (mu, logvar)   x: [B, H*W*C] float32, the likelihood's input transform of the pixels
                                (binarised for bernoulli, scaled 8-bit levels otherwise), flattened
                                channels last as the shards store them; mu, logvar: [B, D] each, the
                                parameters of q(z|x) = N(mu, diag exp(logvar)).
    decode(z) -> params         z: [..., D], with any leading dimensions (vaedist passes [B, D] and
                                [B, S, D] for S samples per datapoint); params: [..., H*W*K], the
                                likelihood's K parameters at each pixel position (h, w), channels last
                                (`vaedist.model.FromImage` turns a conv output [N, K, H, W] into it).
                                K is model.likelihood's params_per_pixel(C): C for bernoulli.

vaedist wraps the module as `VAE.net`, so reparameterisation, sampling, the losses, DDP, checkpoints
(the module's state dict under `net.`), encode and the report work unchanged. Build the same module
from the same arguments every time: the checkpoint stores the config (factory and kwargs) and the
weights, not the code, so encode and report import the factory again (run them where it imports: from
the directory that holds its package, or with it on PYTHONPATH or installed).

Before any cluster work `model.check_model` builds the model on one real batch and checks: it imports, the
factory accepts the arguments, encode and decode return tensors of the right shapes and dtype with
finite values, decode keeps z's leading dimensions (and treats each z alone), and the loss's gradient
reaches every parameter (DDP refuses a parameter that gets none, and the optimiser would never train it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import site
import sys
import sysconfig
from typing import Any, Callable

import torch
from torch import nn

from vaedist.config import ConfigError, ModelConfig

CHECK_BATCH = 4  # datapoints the checks run on (more than 1, so batch norm has statistics)
CHECK_SAMPLES = 3  # S in the [B, S, D] check: not B, so a decode that swaps or merges dims shows


class FactoryError(ConfigError):
    """model.factory cannot be imported, built or used; the message names the factory and what is wrong."""


def _split(spec: str) -> tuple[str, str]:
    module, _, function = spec.partition(":")
    return module, function


def _cwd_first() -> None:
    """The current directory first on sys.path, as for `python -m`: the factory's package is found
    beside where vaedist runs (on Ray's workers that is the job's working directory)."""
    cwd = os.getcwd()
    if not sys.path or os.path.abspath(sys.path[0] or ".") != cwd:
        if cwd in sys.path:
            sys.path.remove(cwd)
        sys.path.insert(0, cwd)


def import_factory(spec: str) -> Callable[..., Any]:
    """The function "package.module:function" names, imported with the current directory first."""
    module_name, function = _split(spec)
    _cwd_first()
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or any error the user's module raises on import
        raise FactoryError(f"model.factory {spec!r}: cannot import {module_name} ({type(e).__name__}: {e}); "
                           f"run from the directory that holds its top-level package ({os.getcwd()} now), put that "
                           "directory on PYTHONPATH, or install the package") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        where = getattr(module, "__file__", module_name)
        raise FactoryError(f"model.factory {spec!r}: {where} has no function {function!r}"
                           + ("" if fn is None else f" (it is a {type(fn).__name__}, not callable)"))
    return fn


def _installed_roots() -> list[str]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages())
    paths.add(site.getusersitepackages())
    return [os.path.realpath(p) for p in paths if p]


def code_location(spec: str) -> str | None:
    """The directory of the factory's top-level package (or its single-file module) that Ray's workers
    need; None when it is installed (site-packages: every node must then have it) or is vaedist's own."""
    top = _split(spec)[0].split(".")[0]
    _cwd_first()
    found = importlib.util.find_spec(top)
    if found is None or top == "vaedist":
        return None
    locations = list(found.submodule_search_locations or [])
    if len(locations) > 1:
        raise FactoryError(f"model.factory {spec!r}: {top} is a namespace package spread over "
                           f"{len(locations)} directories ({', '.join(locations)}); Ray can ship only one: "
                           f"give {top} an __init__.py")
    path = os.path.realpath(locations[0] if locations else found.origin)
    if any(path == root or path.startswith(root + os.sep) for root in _installed_roots()):
        return None
    return path


def build_custom(cfg: ModelConfig, image_shape: tuple[int, int, int], params_per_pixel: int) -> nn.Module:
    """Call the factory with the protocol's arguments; the module it returns must have encode and decode."""
    fn = import_factory(cfg.factory)
    args = {"image_shape": tuple(image_shape), "latent_dim": cfg.latent_dim, "params_per_pixel": params_per_pixel}
    try:
        net = fn(**args, **cfg.kwargs)
    except Exception as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in {**args, **cfg.kwargs}.items())
        raise FactoryError(f"model.factory {cfg.factory!r}: calling it with ({shown}) raised "
                           f"{type(e).__name__}: {e} (model.kwargs {cfg.kwargs})") from None
    if not isinstance(net, nn.Module):
        raise FactoryError(f"model.factory {cfg.factory!r} returned a {type(net).__name__}, not a torch.nn.Module")
    missing = [m for m in ("encode", "decode") if not callable(getattr(net, m, None))]
    if missing:
        raise FactoryError(f"model.factory {cfg.factory!r} returned a {type(net).__name__} without "
                           f"{' and '.join(missing)}: the protocol is encode(x) -> (mu, logvar) and "
                           "decode(z) -> the likelihood's parameters (vaedist/custom_model.py)")
    if not any(True for _ in net.parameters()):
        raise FactoryError(f"model.factory {cfg.factory!r} returned a {type(net).__name__} with no parameters")
    return net


# ---------------------------------------------------------------------------------------------
# The checks on one batch.

def _fail(factory: str, what: str) -> None:
    raise FactoryError(f"model.factory {factory!r}: {what}")


def _call(factory: str, what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        raise FactoryError(f"model.factory {factory!r}: {what} raised {type(e).__name__}: {e}") from None


def _check_tensor(factory: str, what: str, value, shape: tuple[int, ...], dtype: torch.dtype, hint: str = "") -> None:
    if not isinstance(value, torch.Tensor):
        _fail(factory, f"{what} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != shape:
        _fail(factory, f"{what} has shape {list(value.shape)}, expected {list(shape)}{hint}")
    if value.dtype != dtype:
        _fail(factory, f"{what} is {value.dtype}, expected {dtype} (the input's dtype; mixed precision is "
                       "train.mixed_precision's autocast)")
    if not torch.isfinite(value).all():
        _fail(factory, f"{what} has {int((~torch.isfinite(value)).sum())} non-finite values (nan or inf)")


def check_protocol(model, x: torch.Tensor, factory: str) -> None:
    """The protocol's checks of a VAE (vaedist.model) with a custom net on the batch x [B, P]. The
    model comes in as an argument: this module builds nets for model.py and imports nothing of it."""
    net, (b, p), d, f = model.net, x.shape, model.latent_dim, model.num_params
    gen = torch.Generator().manual_seed(0)
    net.train()
    out = _call(factory, f"encode(x) with x of shape [{b}, {p}]", net.encode, x)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        _fail(factory, f"encode(x) returned a {type(out).__name__}, expected a pair (mu, logvar) of [B, latent_dim]")
    for name, value in zip(("mu", "logvar"), out):
        _check_tensor(factory, f"encode(x)'s {name} for x of shape [{b}, {p}]", value, (b, d), x.dtype,
                      f" ([B, model.latent_dim] = [{b}, {d}])")
    z = torch.randn(b, d, generator=gen)
    params = _call(factory, f"decode(z) with z of shape [{b}, {d}]", net.decode, z)
    _check_tensor(factory, f"decode(z) for z of shape [{b}, {d}]", params, (b, f), x.dtype,
                  f" ([B, H*W*params_per_pixel] = [{b}, {f}] for images {list(model.image_shape)} and "
                  f"{model.likelihood.params_per_pixel(model.image_shape[2])} parameters per pixel)")
    s = CHECK_SAMPLES
    zs = torch.randn(b, s, d, generator=gen)
    params = _call(factory, f"decode(z) with z of shape [{b}, {s}, {d}] (S samples per datapoint)", net.decode, zs)
    _check_tensor(factory, f"decode(z) for z of shape [{b}, {s}, {d}]", params, (b, s, f), x.dtype,
                  ": decode must keep z's leading dimensions (vaedist passes [B, S, latent_dim] for S samples "
                  "per datapoint); e.g. lead = z.shape[:-1]; return net(z.reshape(-1, D)).reshape(*lead, -1)")
    net.eval()  # no batch statistics or dropout: each z's parameters must then be its own
    with torch.no_grad():
        together = net.decode(zs)
        alone = net.decode(zs.reshape(b * s, d)).reshape(b, s, f)
    if not torch.allclose(together, alone, rtol=1e-4, atol=1e-4):
        _fail(factory, f"decode(z) for z of shape [{b}, {s}, {d}] differs from decoding the same {b * s} z as "
                       f"[{b * s}, {d}] (max difference {float((together - alone).abs().max()):.3g}): decode mixes "
                       "z's leading dimensions (reshape with z.shape[:-1], not a fixed batch size)")
    net.train()
    model.zero_grad(set_to_none=True)
    eps = torch.randn(b, 1, d, generator=gen)
    params, mu, logvar = _call(factory, "the forward pass", model, x, eps)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
    loss = (-model.likelihood.log_prob(params, x.unsqueeze(1)).mean(1) + kl).mean()
    if not torch.isfinite(loss):
        _fail(factory, f"the negative ELBO of the batch is {float(loss)}")
    _call(factory, "the backward pass", loss.backward)
    named = [(n, q) for n, q in net.named_parameters() if q.requires_grad]
    without = [n for n, q in named if q.grad is None]
    if without:
        _fail(factory, f"{len(without)} of {len(named)} parameters get no gradient from the loss "
                       f"({', '.join(without[:5])}{', ...' if len(without) > 5 else ''}): every parameter must take "
                       "part in encode or decode (DDP fails on unused parameters and the optimiser would never "
                       "train them); remove them or set requires_grad=False")
    bad = [n for n, q in named if not torch.isfinite(q.grad).all()]
    if bad:
        _fail(factory, f"the gradients of {', '.join(bad[:5])} are not finite")
    model.zero_grad(set_to_none=True)
