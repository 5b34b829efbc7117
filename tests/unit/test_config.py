"""Config loading: every shipped config loads; bad keys, types and values name the key."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from vaedist.cli import cli
from vaedist.config import Config, ConfigError, config_from_dict, field_docs, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def not_as_written(written, resolved, key: str = "") -> list[tuple[str, object, object]]:
    """(key, YAML value, resolved value) wherever the resolved config does not hold what the YAML says."""
    if isinstance(written, dict) and isinstance(resolved, dict):
        return [d for k, v in written.items() for d in not_as_written(v, resolved.get(k), f"{key}{k}.")]
    return [] if written == resolved else [(key.rstrip("."), written, resolved)]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_as_written_and_round_trip(path):
    cfg = load_config(path)
    # Every value of the file is in force (none dropped, renamed or coerced into another value) ...
    assert not_as_written(yaml.safe_load(path.read_text()) or {}, cfg.to_dict()) == []
    # ... and the resolved config (what checkpoints and sweeps store) reads back as the same config.
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_defaults_and_overrides_apply_in_order():
    cfg = load_config(REPO / "configs/debug.yaml", ["train.lr=3e-4", "model.hidden_dims=[64, 32]",
                                                    "scaling.use_gpu=false", "encode.checkpoint=/tmp/x"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.hidden_dims == [64, 32]
    assert cfg.model.latent_dim == 8            # from the YAML
    assert cfg.train.optimizer == "adam"        # a default
    assert cfg.encode.checkpoint == "/tmp/x"


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "train.lrr: unknown key; allowed: epochs, batch_size_per_worker, lr"),
    (["trian.lr=1"], "trian: unknown key; allowed: data, model, train"),
    (["model.latent_dim=0"], "model.latent_dim: must be > 0, got 0"),
    (["model.latent_dim=-3"], "model.latent_dim: must be > 0, got -3"),
    (["train.batch_size_per_worker=0"], "train.batch_size_per_worker: must be > 0"),
    (["model.latent_dim=2.5"], "model.latent_dim: must be an integer, got 2.5"),
    (["train.lr=fast"], "train.lr: must be a number, got 'fast'"),
    (["scaling.use_gpu=yes please"], "scaling.use_gpu: must be true or false"),
    (["model.kind=transformer"], "model.kind: must be one of 'mlp', 'conv', 'hierarchical', 'custom', got 'transformer'"),
    (["model.hidden_dims=[64, 0]"], "model.hidden_dims[1]: must be > 0, got 0"),
    (["model.hidden_dims=64"], "model.hidden_dims: must be a list of int"),
    (["encode.splits=[train, val]"], "encode.splits[1]: must be 'train' or 'test', got 'val'"),
    (["train.lr"], "expected key=value"),
    (["model=3"], "model: must be a mapping of kind, latent_dim"),
    (["output.run_name=a/b"], "output.run_name: must be a non-empty name without '/'"),
    (["model.kind=conv", "model.res_blocks_per_stage=1.5"], "model.res_blocks_per_stage: must be an integer"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train.epochz: unknown key.*\(in .*bad.yaml\)"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_resolved_config_round_trips_through_yaml_and_json(tmp_path):
    cfg = load_config(REPO / "configs/mnist.yaml", ["train.seed=11"])
    cfg.save(tmp_path / "c.yaml")
    cfg.save(tmp_path / "c.json")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert json.loads((tmp_path / "c.json").read_text()) == cfg.to_dict()


@pytest.mark.parametrize("section", [f.name for f in dataclasses.fields(Config)])
def test_every_field_is_documented(section):
    cls = type(getattr(Config(), section))
    undocumented = [f.name for f in dataclasses.fields(cls) if f.name not in field_docs(cls)]
    assert not undocumented, f"{section}: fields without a docstring: {undocumented}"


def test_mnist_dir_falls_back_to_environment(monkeypatch):
    monkeypatch.setenv("VAEDIST_MNIST_DIR", "/data/mnist")
    assert load_config(None).data.resolved_mnist_dir() == "/data/mnist"
    assert load_config(None, ["data.mnist_dir=/x"]).data.resolved_mnist_dir() == "/x"


@pytest.mark.parametrize("args, env, code, expected", [
    (["config", "show", "--set", "train.epochs=3"], {}, 0, "epochs: 3"),
    (["config", "show", "--format", "json", "--set", "model.latent_dim=5"], {}, 0, '"latent_dim": 5'),
    (["config", "show"], {"VAEDIST_SET": "train.epochs=4 model.latent_dim=6"}, 0, "latent_dim: 6"),
    (["config", "show", "--config", "configs/debug.yaml"], {}, 0, "run_name: debug"),
    (["config", "show"], {"VAEDIST_CONFIG": "configs/debug.yaml"}, 0, "run_name: debug"),
    (["config", "show", "--set", "train.epochs=0"], {}, 1, "train.epochs: must be > 0, got 0"),
    (["config", "show", "--set", "nope.x=1"], {}, 1, "nope: unknown key"),
])
def test_cli_config_show(args, env, code, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == code, result.output
    assert expected in result.output
    if code == 0 and "--format" not in args:
        assert isinstance(yaml.safe_load(result.output), dict)
