"""The report over a real latent table (conftest.build_tables): files, links, determinism
and the errors for missing inputs."""

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from conftest import LATENT_DIM
from vaedist import schema
from vaedist.checkpoint import CheckpointError, save_checkpoint
from vaedist.config import Config, ModelConfig
from vaedist.data import DataError
from vaedist.model import VAE
from vaedist.query import QueryError
from vaedist.report import FIGURES, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reports(latent_tables, tmp_path_factory) -> tuple[Path, Path]:
    """The same report written twice, from the checkpoint and shards that _lineage.json names."""
    out = tmp_path_factory.mktemp("reports")
    first = write_report(latent_tables["latents"], str(out / "first"), num_examples=12, seed=3)
    second = write_report(latent_tables["latents"], str(out / "second"), num_examples=12, seed=3)
    return Path(first).parent, Path(second).parent


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and the chunk's CRC."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    return struct.unpack(">II", data[16:24])


def test_report_writes_every_figure_and_links_it(reports):
    out, _ = reports
    page = (out / "index.html").read_text()
    for name in FIGURES:
        data = (out / name).read_bytes()
        width, height = png_size(data)
        assert 300 <= width <= 2000 and 200 <= height <= 2000, (name, width, height)
        assert 5_000 < len(data) < 2_000_000, (name, len(data))
        assert f'src="{name}"' in page
    assert set(re.findall(r'src="([^"]+)"', page)) == set(FIGURES)  # relative links, nothing else
    assert "an_unknown_key" in page  # lineage shown, extra keys included
    assert page.count("<tr>") == 1 + 10  # loss-by-digit summary: a header and one row per digit


def test_report_is_reproducible(reports):
    first, second = reports
    for name in [*FIGURES, "index.html"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_report_without_log_px(latent_tables, tmp_path):
    index = write_report(latent_tables["latents_k0"], str(tmp_path / "k0"), num_examples=4)
    assert "gap_mean" not in Path(index).read_text()


def test_missing_checkpoint_is_named(latent_tables, tmp_path):
    missing = tmp_path / "no-checkpoint"
    with pytest.raises(CheckpointError, match=rf"checkpoint {missing} does not exist"):
        write_report(latent_tables["latents"], str(tmp_path / "out"), checkpoint=str(missing))


def test_missing_checkpoint_from_lineage_points_at_the_lineage(latent_tables, tmp_path):
    table = tmp_path / "latents"
    table.mkdir()
    for f in Path(latent_tables["latents"]).glob("[!_.]*.parquet"):
        (table / f.name).write_bytes(f.read_bytes())
    lineage = json.loads(Path(latent_tables["latents"], schema.LINEAGE_FILE).read_text())
    (table / schema.LINEAGE_FILE).write_text(json.dumps({**lineage, "checkpoint": str(tmp_path / "gone")}))
    (table / schema.SUCCESS_FILE).write_text("")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/gone does not exist \(named in {table}/_lineage.json"):
        write_report(str(table), str(tmp_path / "out"))


def test_missing_shards_are_named(latent_tables, tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/no-shards/manifest.json not found"):
        write_report(latent_tables["latents"], str(tmp_path / "out"), shards_dir=str(tmp_path / "no-shards"))


def test_checkpoint_of_another_shape_is_refused(latent_tables, tmp_path):
    cfg = Config(model=ModelConfig(latent_dim=LATENT_DIM + 1, hidden_dims=[8]))
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "other"), model_state=VAE(cfg.model).state_dict(), optimizer_state=None,
                    epoch=1, global_step=0, config=cfg, manifest_hash="x", history=[])
    with pytest.raises(CheckpointError, match=rf"latent_dim {LATENT_DIM + 1} but latent table .* has {LATENT_DIM}"):
        write_report(latent_tables["latents"], str(tmp_path / "out"), checkpoint=str(tmp_path / "other"))


def test_not_a_table(tmp_path):
    with pytest.raises(QueryError, match="is not a published vaedist latent table"):
        write_report(str(tmp_path / "nothing"), str(tmp_path / "out"))
