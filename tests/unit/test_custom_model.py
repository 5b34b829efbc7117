"""model.kind=custom without Ray: the factory is imported from the current directory, built with the
protocol's arguments, wrapped so the VAE's interface works, and each way a factory can break the
protocol is an error naming the factory and what is wrong."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from vaedist.config import ConfigError, ModelConfig, config_from_dict
from vaedist.custom_model import FactoryError, code_location
from vaedist.model import check_model
from vaedist.losses import batch_loss, negative_elbo
from vaedist.model import VAE

PACKAGE = "vaedist_test_factories"
FACTORIES = '''
import torch
from torch import nn


class Net(nn.Module):
    """A protocol-abiding MLP; the keyword flags break one rule each."""

    def __init__(self, image_shape, latent_dim, params_per_pixel, width=16, mu_extra=0, out_extra=0,
                 flatten_only=False, swap=False, nonfinite=False, spare=False, double=False):
        super().__init__()
        h, w, c = image_shape
        self.d, self.f = latent_dim, h * w * params_per_pixel
        self.enc = nn.Sequential(nn.Linear(h * w * c, width), nn.Tanh(), nn.Linear(width, 2 * latent_dim + mu_extra))
        self.dec = nn.Sequential(nn.Linear(latent_dim, width), nn.Tanh(), nn.Linear(width, self.f + out_extra))
        self.mu_extra, self.flatten_only, self.swap, self.nonfinite, self.double = mu_extra, flatten_only, swap, nonfinite, double
        if spare:
            self.spare = nn.Linear(2, 2)

    def encode(self, x):
        out = self.enc(x)
        mu, logvar = out[:, :self.d + self.mu_extra], out[:, -self.d:]
        return (mu.double(), logvar.double()) if self.double else (mu, logvar)

    def decode(self, z):
        out = self.dec(z.reshape(-1, self.d))
        if self.nonfinite:
            out = out + torch.log(torch.zeros(()))
        if self.flatten_only:
            return out
        if self.swap and z.dim() == 3:  # the right shape, but each z's parameters land elsewhere
            return out.reshape(z.shape[1], z.shape[0], -1).transpose(0, 1)
        return out.reshape(*z.shape[:-1], -1)


def build(image_shape, latent_dim, params_per_pixel, **kwargs):
    return Net(image_shape, latent_dim, params_per_pixel, **kwargs)


def not_a_module(image_shape, latent_dim, params_per_pixel):
    return "a string"


def no_decode(image_shape, latent_dim, params_per_pixel):
    return nn.Linear(2, 2)


NOT_CALLABLE = 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A package of factories in a directory that is the current one, and on no other sys.path entry."""
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "nets.py").write_text(textwrap.dedent(FACTORIES))
    (tmp_path / PACKAGE / "broken.py").write_text("import a_module_that_does_not_exist_anywhere\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the import puts the cwd first; undone afterwards
    yield tmp_path
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def custom(function="build", **kwargs) -> ModelConfig:
    return ModelConfig(kind="custom", latent_dim=3, factory=f"{PACKAGE}.nets:{function}", kwargs=kwargs)


def batch(n=6, pixels=784):
    rng = np.random.default_rng(0)
    return np.arange(n), rng.integers(0, 256, (n, pixels), dtype=np.uint8)


def test_a_good_factory_trains_through_the_vaes_interface(factories):
    cfg = custom(width=8)
    check_model(cfg, (28, 28, 1), batch())
    model = VAE(cfg)
    assert type(model.net).__name__ == "Net" and model.net.enc[0].out_features == 8  # kwargs reached it
    assert all(k.startswith("net.") for k in model.state_dict())
    x = torch.bernoulli(torch.full((5, 784), 0.3))
    params, mu, _ = model(x, eps=torch.randn(5, 2, 3))
    assert params.shape == (5, 2, 784) and mu.shape == (5, 3)
    batch_loss(negative_elbo(model, x, num_samples=2)).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, 784)
    # Rebuilt from the config alone (what a checkpoint holds), the weights load.
    torch.manual_seed(1)
    again = VAE(cfg)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.decode(torch.ones(1, 3)), model.decode(torch.ones(1, 3)))
    assert code_location(cfg.factory) == str((factories / PACKAGE).resolve())


def test_installed_code_is_not_shipped():
    assert code_location("torch.nn:Linear") is None and code_location("vaedist.model:VAE") is None


@pytest.mark.parametrize("cfg,message", [
    (custom(mu_extra=1), r"encode\(x\)'s mu for x of shape \[4, 784\] has shape \[4, 4\], expected \[4, 3\]"),
    (custom(out_extra=-1), r"decode\(z\) for z of shape \[4, 3\] has shape \[4, 783\], expected \[4, 784\]"),
    (custom(flatten_only=True), r"decode\(z\) for z of shape \[4, 3, 3\] has shape \[12, 784\], expected "
                                r"\[4, 3, 784\]: decode must keep z's leading dimensions"),
    (custom(swap=True), r"decode mixes z's leading dimensions"),
    (custom(nonfinite=True), r"decode\(z\) for z of shape \[4, 3\] has 3136 non-finite values"),
    (custom(spare=True), r"2 of 10 parameters get no gradient from the loss \(spare.weight, spare.bias\)"),
    (custom(double=True), r"encode\(x\)'s mu .* is torch.float64, expected torch.float32"),
    (custom(colour=3), r"calling it with \(image_shape=\(28, 28, 1\), latent_dim=3, params_per_pixel=1, "
                       r"colour=3\) raised TypeError"),
    (custom("not_a_module"), r"returned a str, not a torch.nn.Module"),
    (custom("no_decode"), r"returned a Linear without encode and decode"),
    (custom("NOT_CALLABLE"), r"nets.py has no function 'NOT_CALLABLE' \(it is a int, not callable\)"),
    (custom("missing"), r"nets.py has no function 'missing'"),
    (ModelConfig(kind="custom", factory=f"{PACKAGE}.broken:build"),
     r"cannot import vaedist_test_factories.broken \(ModuleNotFoundError: No module named "
     r"'a_module_that_does_not_exist_anywhere'\)"),
    (ModelConfig(kind="custom", factory="no_such_package_here.model:build"),
     r"cannot import no_such_package_here.model \(ModuleNotFoundError.*\); run from the directory that holds"),
], ids=["mu-shape", "params-shape", "ignores-batch-shape", "mixes-samples", "non-finite", "unused-parameter",
        "float64", "bad-kwargs", "not-a-module", "no-decode", "not-callable", "missing-function", "broken-import",
        "not-importable"])
def test_a_broken_factory_is_an_error_naming_it_and_what_is_wrong(factories, cfg, message):
    with pytest.raises(FactoryError, match=r"model.factory '" + cfg.factory.replace(".", r"\.") + "'.*" + message):
        check_model(cfg, (28, 28, 1), batch())


def test_the_factory_gets_the_likelihoods_parameters_per_pixel_and_the_image_shape(factories):
    model = VAE(custom(), image_shape=(8, 4, 3))
    assert model.net.f == 8 * 4 * model.likelihood.params_per_pixel(3) and model.num_params == model.net.f
    check_model(custom(), (8, 4, 3), batch(pixels=96))


def test_a_factory_found_only_in_the_current_directory(factories, monkeypatch, tmp_path_factory):
    check_model(custom(), (28, 28, 1), batch())
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    for name in [m for m in sys.modules if m.startswith(PACKAGE)]:
        del sys.modules[name]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(factories)])
    with pytest.raises(FactoryError, match=rf"cannot import {PACKAGE}.nets .*\({elsewhere} now\)"):
        check_model(custom(), (28, 28, 1), batch())


@pytest.mark.parametrize("overrides,message", [
    (["model.kind=custom"], 'model.factory: model.kind=custom needs it: "package.module:function"'),
    (["model.kind=custom", "model.factory=toyvae.model"], 'model.factory: must be "package.module:function"'),
    (["model.kind=custom", "model.factory=toy-vae.model:build"], 'model.factory: must be "package.module:function"'),
    (["model.factory=toyvae.model:build"], "model.factory: only model.kind=custom uses it (kind is mlp)"),
    (["model.kwargs.width=3"], "model.kwargs: only model.kind=custom uses it"),
    (["model.kind=custom", "model.factory=a:b", "model.kwargs=[1]"], "model.kwargs: must be a mapping of str to plain"),
    (["model.kind=conv", "model.norm=instance"], "model.norm: must be one of 'none', 'batch', 'group', 'layer'"),
    (["model.norm=group"], "model.norm: only model.kind=conv and model.group_stage=conv use it (kind is mlp)"),
    (["model.kind=conv", "model.res_blocks_per_stage=-1"], "model.res_blocks_per_stage: must be >= 0"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, overrides)
    assert message in str(e.value)


def test_kwargs_take_plain_yaml_values_and_nothing_else():
    cfg = config_from_dict({"model": {"kind": "custom", "factory": "a.b:c",
                                      "kwargs": {"width": 64, "ratios": [0.5, 1], "block": {"kind": "res", "n": None}}}},
                           ["model.kwargs.depth=3"])
    assert cfg.model.kwargs == {"width": 64, "ratios": [0.5, 1.0], "block": {"kind": "res", "n": None}, "depth": 3}
    # What a checkpoint stores and reads back.
    assert config_from_dict(cfg.to_dict()).model == cfg.model
    with pytest.raises(ConfigError, match=r"model.kwargs.block.when: must be plain data .* got set"):
        config_from_dict({"model": {"kind": "custom", "factory": "a.b:c", "kwargs": {"block": {"when": {1}}}}})
    with pytest.raises(ConfigError, match=r"model.kwargs \(a key\): must be a string, got 1"):
        config_from_dict({"model": {"kind": "custom", "factory": "a.b:c", "kwargs": {1: 2}}})


def test_a_checkpoint_rebuilds_its_custom_model_and_says_so_when_the_factory_is_gone(factories, monkeypatch,
                                                                                     tmp_path_factory):
    from vaedist.checkpoint import CheckpointError, load_model, save_checkpoint
    from vaedist.config import Config

    cfg = Config(model=custom(width=8))
    model = VAE(cfg.model)
    where = str(tmp_path_factory.mktemp("checkpoint"))
    save_checkpoint(where, model_state=model.state_dict(), optimizer_state=None, epoch=0, global_step=0,
                    config=cfg, manifest_hash="x", history=[])
    loaded, saved_cfg, _ = load_model(where)
    assert saved_cfg.model.factory == cfg.model.factory and saved_cfg.model.kwargs == {"width": 8}
    assert torch.equal(loaded.decode(torch.ones(2, 3)), model.eval().decode(torch.ones(2, 3)))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    for name in [m for m in sys.modules if m.startswith(PACKAGE)]:
        del sys.modules[name]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(factories)])
    with pytest.raises(CheckpointError, match=rf"checkpoint {where}/checkpoint.pt: model.factory "
                                              rf"'{PACKAGE}.nets:build': cannot import {PACKAGE}.nets"):
        load_model(where)


def test_the_custom_model_code_imports_no_ray_or_yaml():
    """Torch only, like model.py: shipping the code to Ray's workers is user_code.py's."""
    import subprocess

    code = ("import sys, vaedist.model, vaedist.custom_model; "
            "bad = [m for m in ('ray', 'yaml', 'pyarrow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
