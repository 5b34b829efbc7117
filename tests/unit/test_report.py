"""The report over a real latent table (conftest.build_tables): files, links, determinism, the
training section, and the errors for missing inputs."""

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from conftest import LATENT_DIM
from vaedist import schema
from vaedist.checkpoint import CheckpointError, save_checkpoint, write_metrics
from vaedist.config import Config, ModelConfig
from vaedist.data import DataError
from vaedist.model import VAE
from vaedist.query import QueryError
from vaedist.report import FIGURES, TRAINING_FIGURE, write_report

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
    # conftest's checkpoint lies outside a run directory: no curves, and the page says why.
    assert not (out / TRAINING_FIGURE).exists()
    assert "No training metrics: checkpoint " in page and "is not inside a run directory" in page


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


def table_naming(latent_tables, checkpoint: Path, table: Path) -> Path:
    """A copy of the published table whose _lineage.json names another checkpoint."""
    table.mkdir()
    for f in Path(latent_tables["latents"]).glob("[!_.]*.parquet"):
        (table / f.name).write_bytes(f.read_bytes())
    lineage = json.loads(Path(latent_tables["latents"], schema.LINEAGE_FILE).read_text())
    (table / schema.LINEAGE_FILE).write_text(json.dumps({**lineage, "checkpoint": str(checkpoint)}))
    (table / schema.SUCCESS_FILE).write_text("")
    return table


def run_around_checkpoint(latent_tables, run: Path, rows: list[dict] | None, subdir: str = "epoch-0002") -> Path:
    """A run directory holding the table's own checkpoint as <run>/<subdir>/checkpoint.pt, and
    metrics.jsonl with `rows` (none when None); returns the checkpoint file."""
    shutil.copytree(latent_tables["checkpoint"], run / subdir)
    if rows is not None:
        write_metrics(str(run), rows)
    return run / subdir / "checkpoint.pt"


# As train.py writes them: epoch 0 without a test evaluation (train.eval_every_epochs = 2).
EPOCH_ROWS = [
    {"kind": "epoch", "epoch": 0, "step": 20, "train_loss": 210.5, "test_loss": None, "test_count": 0},
    {"kind": "epoch", "epoch": 1, "step": 40, "train_loss": 160.25, "test_loss": 150.5, "test_count": 1000},
    {"kind": "epoch", "epoch": 2, "step": 60, "train_loss": 145.0, "test_loss": 141.75, "test_count": 1000},
]
FINAL_ROW = {"kind": "final", "epoch": 2, "num_samples_iw": 8, "test_nll_iw": 135.254, "test_loss": 141.75,
             "test_count": 1000}


def test_training_section_from_the_checkpoints_run(latent_tables, tmp_path):
    checkpoint = run_around_checkpoint(latent_tables, tmp_path / "run", EPOCH_ROWS + [FINAL_ROW])
    table = table_naming(latent_tables, checkpoint, tmp_path / "latents")
    outs = [Path(write_report(str(table), str(tmp_path / name), num_examples=4)).parent for name in ("a", "b")]
    page = (outs[0] / "index.html").read_text()
    width, height = png_size((outs[0] / TRAINING_FIGURE).read_bytes())
    assert 300 <= width <= 2000 and 200 <= height <= 2000
    assert set(re.findall(r'src="([^"]+)"', page)) == {*FIGURES, TRAINING_FIGURE}
    assert f"<li>run: <code>{tmp_path / 'run'}</code></li>" in page
    assert "over 3 epochs" in page and "the 2 evaluated epochs" in page  # the null test loss is left out
    assert ("Importance-weighted test NLL after training: <strong>135.25 nats</strong> (K = 8 importance samples, "
            "1,000 test datapoints; the test negative ELBO at the same point: 141.75 nats)") in page
    assert "No training metrics" not in page
    for name in (TRAINING_FIGURE, "index.html"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_training_section_without_a_final_row_says_so(latent_tables, tmp_path):
    # A checkpoint kept for good (output.keep_epochs) belongs to the run two levels up.
    checkpoint = run_around_checkpoint(latent_tables, tmp_path / "run", EPOCH_ROWS, subdir="kept/epoch-0002")
    page = Path(write_report(latent_tables["latents"], str(tmp_path / "out"), checkpoint=str(checkpoint),
                             num_examples=4)).read_text()
    assert f'src="{TRAINING_FIGURE}"' in page and "Importance-weighted test NLL after training" not in page
    assert f"No importance-weighted test NLL: {tmp_path}/run/metrics.jsonl has no final row" in page


def test_a_run_without_metrics_gets_a_note(latent_tables, tmp_path):
    checkpoint = run_around_checkpoint(latent_tables, tmp_path / "run", None)
    table = table_naming(latent_tables, checkpoint, tmp_path / "latents")
    out = Path(write_report(str(table), str(tmp_path / "out"), num_examples=4)).parent
    page = (out / "index.html").read_text()
    assert f"No training metrics: {tmp_path}/run/metrics.jsonl does not exist." in page
    assert not (out / TRAINING_FIGURE).exists() and set(re.findall(r'src="([^"]+)"', page)) == set(FIGURES)


@pytest.mark.parametrize("line, problem", [
    ("{not json", r"metrics.jsonl is not JSON lines"),
    ('{"kind": "epoch", "epoch": 0, "train_loss": "high", "test_loss": 1.0}',
     r"metrics.jsonl row 2: train_loss is 'high', expected a finite number"),
    ('{"kind": "epoch", "epoch": 0, "train_loss": 1.0, "test_loss": NaN}',
     r"metrics.jsonl row 2: test_loss is nan, expected a finite number or null"),
    ('{"kind": "epoch", "epoch": -1, "train_loss": 1.0, "test_loss": 1.0}',
     r"metrics.jsonl row 2: epoch is -1, expected an integer >= 0"),
    ('{"kind": "final", "num_samples_iw": 0, "test_nll_iw": 1.0}',
     r"metrics.jsonl row 2: num_samples_iw is 0, expected an integer > 0"),
])
def test_bad_metrics_are_named(latent_tables, tmp_path, line, problem):
    checkpoint = run_around_checkpoint(latent_tables, tmp_path / "run", EPOCH_ROWS[:1])
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write(line + "\n")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}/run/{problem}"):
        write_report(latent_tables["latents"], str(tmp_path / "out"), checkpoint=str(checkpoint))


def test_explicit_run_dir(latent_tables, tmp_path):
    with pytest.raises(CheckpointError, match=rf"run directory {tmp_path}/nowhere does not exist"):
        write_report(latent_tables["latents"], str(tmp_path / "out"), run_dir=str(tmp_path / "nowhere"))
    run = tmp_path / "elsewhere"
    run.mkdir()
    write_metrics(str(run), EPOCH_ROWS)
    # conftest's checkpoint is outside any run; the run named explicitly gives the curves.
    page = Path(write_report(latent_tables["latents"], str(tmp_path / "out"), run_dir=str(run),
                             num_examples=4)).read_text()
    assert f'src="{TRAINING_FIGURE}"' in page and "No training metrics" not in page


def test_missing_checkpoint_from_lineage_points_at_the_lineage(latent_tables, tmp_path):
    table = table_naming(latent_tables, tmp_path / "gone", tmp_path / "latents")
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
