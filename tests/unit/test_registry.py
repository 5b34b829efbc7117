"""vaedist.registry is the one list of the pluggable parts' names: the config's types, the CLI's
choices and the registries of objects all come from it."""

from __future__ import annotations

import typing

import pytest

from vaedist import registry
from vaedist.cli import cli
from vaedist.config import ConfigError, DataConfig, ModelConfig, TrainConfig, config_from_dict
from vaedist.likelihoods import LIKELIHOODS
from vaedist.objectives import OBJECTIVES


def test_config_types_come_from_the_registry():
    literal = {name: typing.get_args(typing.get_type_hints(cls)[field])
               for name, cls, field in (("likelihood", ModelConfig, "likelihood"), ("objective", TrainConfig, "objective"),
                                        ("source", DataConfig, "source"))}
    assert literal == {"likelihood": registry.LIKELIHOODS, "objective": tuple(registry.OBJECTIVES),
                       "source": registry.DATA_SOURCES}
    with pytest.raises(ConfigError, match="data.source: must be one of 'builtin', 'images', 'webdataset', 'arrays'"):
        config_from_dict({"data": {"source": "csv"}})


def test_cli_choices_come_from_the_registry():
    prepare = cli.commands["data"].commands["prepare"]
    source = next(p for p in prepare.params if p.name == "source")
    assert tuple(source.type.choices) == registry.DATA_SOURCES


def test_the_registries_of_objects_hold_exactly_the_listed_names():
    assert tuple(LIKELIHOODS) == registry.LIKELIHOODS
    assert {n for n, cls in LIKELIHOODS.items() if cls.binarised} == registry.BINARISED_LIKELIHOODS
    assert tuple(OBJECTIVES) == tuple(registry.OBJECTIVES)
    for kind in registry.EXTERNAL_SOURCES:
        assert registry.source_class(kind).kind == kind
    # Each objective's own setting is a TrainConfig field.
    assert {s for s in registry.OBJECTIVES.values() if s} <= set(typing.get_type_hints(TrainConfig))


def test_a_registry_out_of_step_with_its_list_fails_loudly():
    with pytest.raises(RuntimeError, match=r"train.objective: the registry holds \['elbo'\] but vaedist.registry lists"):
        registry.check_registry("train.objective", {"elbo": object}, registry.OBJECTIVES)
    with pytest.raises(ValueError, match=r"data.source 'csv' is not an external source \(images, webdataset, arrays\)"):
        registry.source_class("csv")
