"""The `vaedist` command through click's CliRunner: data prepare/verify on the real MNIST files,
and the clear errors for bad input."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from vaedist.cli import cli


@pytest.fixture(scope="module")
def prepared(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "shards"
    result = CliRunner().invoke(cli, ["data", "prepare", "--mnist-dir", mnist_dir, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_prepare_writes_all_of_mnist(prepared):
    out, output = prepared
    assert "train: 60000 datapoints in 24 shards" in output
    assert "test: 10000 datapoints in 4 shards" in output
    assert (out / "manifest.json").exists() and len(list((out / "train").glob("*.tar"))) == 24


def test_verify_passes_then_names_the_damaged_shard(prepared, tmp_path):
    out, _ = prepared
    runner = CliRunner()
    ok = runner.invoke(cli, ["data", "verify", "--shards", str(out)])
    assert ok.exit_code == 0 and "verified" in ok.output, ok.output

    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    shard = copy / "test" / "test-000002.tar"
    original = shard.read_bytes()

    flipped = bytearray(original)
    flipped[100_000] ^= 0x01
    shard.write_bytes(bytes(flipped))
    bad = runner.invoke(cli, ["data", "verify", "--shards", str(copy)])
    assert bad.exit_code == 1 and "test-000002.tar" in bad.output and "sha256" in bad.output, bad.output

    shard.write_bytes(original[:-1024])
    bad = runner.invoke(cli, ["data", "verify", "--shards", str(copy)])
    assert bad.exit_code == 1 and "test-000002.tar" in bad.output, bad.output

    shard.unlink()
    bad = runner.invoke(cli, ["data", "verify", "--shards", str(copy)])
    assert bad.exit_code == 1 and "test-000002.tar" in bad.output and "missing" in bad.output, bad.output
    assert "Traceback" not in bad.output


@pytest.mark.parametrize("args, expected", [
    (["data", "verify", "--shards", "/nonexistent/shards"], "/nonexistent/shards"),
    (["data", "prepare", "--mnist-dir", "/nonexistent/mnist", "--out", "{tmp}/s"], "/nonexistent/mnist"),
    (["data", "prepare", "--set", "data.samples_per_shard=0", "--out", "{tmp}/s"], "data.samples_per_shard: must be > 0"),
    (["train", "--set", "data.shards_dir={tmp}/none"], "does not exist; run `vaedist data prepare`"),
    (["encode", "--checkpoint", "{tmp}/nope"], "does not exist"),
    (["query", "SELECT 1", "--latents", "{tmp}"], "not a published vaedist latent table"),
    (["query", "neighbours", "--latents", "{tmp}"], "neighbours needs --key"),
])
def test_bad_input_is_one_clear_line(args, expected, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert "Traceback" not in result.output


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    for args in (["data", "prepare"], ["data", "verify"], ["train"], ["encode"], ["query"], ["report"], ["run"],
                 ["bench", "train"], ["bench", "encode"], ["config", "show"]):
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0 and "vaedist " in result.output, (args, result.output)
