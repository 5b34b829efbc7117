"""The report over real latent tables (conftest.build_tables and write_latent_table): files, links,
determinism, the diagnostics, a table of several checkpoints (index.html at one epoch, dynamics.html),
the comparison page, a dataset that names its classes (Fashion-MNIST), the training section, and the
errors for missing or mismatched inputs."""

import html
import io
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import LATENT_DIM, write_latent_table
from vaedist import analyses, report, schema
from vaedist.analyses import QueryError, read_lineage
from vaedist.checkpoint import CheckpointError, save_checkpoint, write_metrics
from vaedist.cli import cli
from vaedist.config import Config, ModelConfig
from vaedist.data import DataError, manifest_hash, prepare_shards, read_manifest
from vaedist.model import VAE
from vaedist.report import (COMPARISON_FIGURES, COMPARISON_PAGE, DIAGNOSTIC_FIGURES, DYNAMICS_FIGURES, DYNAMICS_PAGE,
                            FIGURES, TRAINING_FIGURE, write_comparison, write_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INDEX_FIGURES = {**FIGURES, **DIAGNOSTIC_FIGURES}
EPOCHS = (1, 2, 4)  # not consecutive: "consecutive" means adjacent among the encoded epochs
CFG = Config(model=ModelConfig(latent_dim=LATENT_DIM, hidden_dims=[32]))


def untrained(seed: int, image_shape: tuple[int, int, int] = (28, 28, 1)) -> VAE:
    """conftest.build_tables' model when seed = 0."""
    torch.manual_seed(seed)
    return VAE(CFG.model, image_shape).eval()


@pytest.fixture(scope="module")
def reports(latent_tables, tmp_path_factory) -> tuple[Path, Path]:
    """The same report written twice, from the checkpoint and shards that _lineage.json names."""
    out = tmp_path_factory.mktemp("reports")
    first = write_report(latent_tables["latents"], str(out / "first"), num_examples=12, seed=3)
    second = write_report(latent_tables["latents"], str(out / "second"), num_examples=12, seed=3)
    return Path(first).parent, Path(second).parent


@pytest.fixture(scope="module")
def epochs_table(latent_tables, tmp_path_factory) -> str:
    """Three checkpoints of one "run" (untrained models, seeds 0-2) as epochs 1, 2, 4 over the test
    split, each epoch's checkpoint named in the lineage as the encode job names them."""
    root = tmp_path_factory.mktemp("epochs")
    models = {epoch: untrained(seed) for seed, epoch in enumerate(EPOCHS)}
    checkpoints = []
    for epoch, model in models.items():
        directory = root / "run" / f"epoch-{epoch:04d}"
        save_checkpoint(str(directory), model_state=model.state_dict(), optimizer_state=None, epoch=epoch,
                        global_step=0, config=CFG, manifest_hash=manifest_hash(latent_tables["shards"]), history=[])
        checkpoints.append({"epoch": epoch, "path": str(directory / "checkpoint.pt")})
    lineage = {**read_lineage(latent_tables["latents"]).to_dict(), "checkpoint": checkpoints[-1]["path"],
               "checkpoints": checkpoints, "binarize_seed": 0}
    return write_latent_table(root / "table", latent_tables["shards"], models, lineage, num_samples_iw=0,
                              splits=("test",))


@pytest.fixture(scope="module")
def other_table(latent_tables, tmp_path_factory) -> str:
    """Another checkpoint's table over the same datapoints as latent_tables["latents"]."""
    root = tmp_path_factory.mktemp("other")
    lineage = {**read_lineage(latent_tables["latents"]).to_dict(), "checkpoint": "another checkpoint"}
    return write_latent_table(root / "table", latent_tables["shards"], {None: untrained(1)}, lineage, num_samples_iw=0)


@pytest.fixture(scope="module")
def fashion_table(fashion_dir, tmp_path_factory) -> str:
    """Fashion-MNIST (500 datapoints per split) and an untrained model's table with its lineage's
    dataset, image shape and class names, as the encode job writes them."""
    source = fashion_dir
    root = tmp_path_factory.mktemp("fashion")
    shards = str(root / "shards")
    prepare_shards(shards, "fashion-mnist", source_dir=source, samples_per_shard=250, limit_per_split=500,
                   progress=False)
    info = read_manifest(shards).dataset
    model = untrained(0, info.image_shape)
    save_checkpoint(str(root / "checkpoint"), model_state=model.state_dict(), optimizer_state=None, epoch=1,
                    global_step=0, config=CFG, manifest_hash=manifest_hash(shards), history=[], dataset=info.name,
                    image_shape=info.image_shape)
    lineage = {"checkpoint": str(root / "checkpoint"), "shards_dir": shards, "manifest_hash": manifest_hash(shards),
               "dataset": info.name, "image_shape": list(info.image_shape), "class_names": list(info.class_names),
               "binarize_seed": 0, "latent_dim": LATENT_DIM, "config": CFG.to_dict()}
    return write_latent_table(root / "table", shards, {None: model}, lineage, num_samples_iw=0)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature and the chunk's CRC."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    return struct.unpack(">II", data[16:24])


def table_rows(page: str, css_class: str) -> list[list[str]]:
    """The cells of the page's <table class="css_class">, header row first, unescaped."""
    match = re.search(rf'<table class="{css_class}">(.*?)</table>', page, re.DOTALL)
    assert match, f"no table {css_class}"
    return [[html.unescape(cell) for cell in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", match[1], re.DOTALL)]


def text_of(page: str) -> str:
    """What a reader sees: the page without its tags (and their attributes, e.g. file names)."""
    return html.unescape(re.sub(r"<[^>]*>", " ", page))


def assert_figures(out: Path, page: str, names) -> None:
    """Each figure is a whole PNG of a sensible size, linked from the page, and nothing else is."""
    for name in names:
        data = (out / name).read_bytes()
        width, height = png_size(data)
        assert 300 <= width <= 2000 and 80 <= height <= 2000, (name, width, height)  # 80: one row of images
        assert 2_000 < len(data) < 2_000_000, (name, len(data))
    assert set(re.findall(r'src="([^"]+)"', page)) == set(names)  # relative links, nothing else


def assert_same_files(first: Path, second: Path) -> None:
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_report_writes_every_figure_and_links_it(reports):
    out, _ = reports
    page = (out / "index.html").read_text()
    assert_figures(out, page, INDEX_FIGURES)
    assert "an_unknown_key" in page  # lineage shown, extra keys included
    rows = table_rows(page, "loss-by-class")  # a header and one row per digit
    assert [r[0] for r in rows] == ["label", *map(str, range(10))] and rows[0][1] == "count"
    assert all(f">{heading}<" in page for heading in ("Loss by digit", "Loss per digit", "Highest-loss digits",
                                                      "Evidence gap per digit"))
    # conftest's checkpoint lies outside a run directory: no curves, and the page says why.
    assert not (out / TRAINING_FIGURE).exists()
    assert "No training metrics: checkpoint " in page and "is not inside a run directory" in page
    assert DYNAMICS_PAGE not in page and not (out / DYNAMICS_PAGE).exists()  # one checkpoint: no dynamics


def test_report_is_reproducible(reports):
    assert_same_files(*reports)


def test_diagnostics_show_the_tables_numbers(reports, latent_tables):
    page = (reports[0] / "index.html").read_text()
    df = pd.read_parquet(latent_tables["latents"])  # pandas alone: skips _* and .* files
    totals = table_rows(page, "totals")
    assert totals[0] == ["split", "count", "mean l_i ± s.e.", "mean -log p(x) ± s.e.", "mean gap ± s.e."]
    for row, (split, part) in zip(totals[1:], sorted(df.groupby("split"))):
        n = len(part)
        assert row[:3] == [split, str(n), f"{part.loss.mean():.2f} ± {part.loss.std() / np.sqrt(n):.2f}"]
        assert row[3] == f"{-part.log_px.mean():.2f} ± {part.log_px.std() / np.sqrt(n):.2f}"
    test = df[df.split == "test"]
    variance = np.stack(test.mu.to_numpy()).astype(np.float64).var(axis=0)
    assert f"{(variance > 0.01).sum()} of {LATENT_DIM} latent dimensions are active" in page
    gap = table_rows(page, "gap-by-class")
    assert [r[0] for r in gap[1:]] == list(map(str, range(10)))
    assert [r[2] for r in gap[1:]] == [f"{g.gap.mean():.2f} ± {g.gap.std() / np.sqrt(len(g)):.2f}"
                                       for _, g in sorted(test.groupby("label"))]
    # The outliers shown are the analysis's, highest z first: the class-relative, not the global, ranking.
    expected = analyses.outliers(latent_tables["latents"], k=12, split="test").to_pylist()
    shown = table_rows(page, "outliers")[1:]
    assert [r[0] for r in shown] == [r["key"] for r in expected]
    assert [r[4] for r in shown] == [f"{r['z_score']:.2f}" for r in expected]
    assert [r[2] for r in shown] == [str(r["label"]) for r in expected]


def test_report_without_log_px(latent_tables, tmp_path):
    page = Path(write_report(latent_tables["latents_k0"], str(tmp_path / "k0"), num_examples=4)).read_text()
    assert "gap_mean" not in page and "-log p(x)" not in table_rows(page, "totals")[0]
    assert 'class="no-log-px">No evidence gap: the table has no log p(x) estimates' in page
    assert 'class="gap-by-class"' not in page


# ---------------------------------------------------------------------------------------------
# A table of several checkpoints: index.html at one epoch, dynamics.html over all of them.

def test_a_table_of_several_checkpoints(epochs_table, tmp_path):
    outs = [Path(write_report(epochs_table, str(tmp_path / name), num_examples=4)).parent for name in ("a", "b")]
    assert_same_files(*outs)
    out = outs[0]
    page = (out / "index.html").read_text()
    assert_figures(out, page, INDEX_FIGURES)
    assert ("This table encodes 3 checkpoints of one run (epochs 1, 2, 4). The figures and tables on this page are "
            f'of epoch 4 (the last); <a href="{DYNAMICS_PAGE}">training dynamics</a>') in page
    lineage = read_lineage(epochs_table)
    assert f"<li>checkpoint: <code>{lineage.checkpoints[-1]['path']}</code></li>" in page
    # Epoch 4's rows only, as the query of one checkpoint gives them.
    expected = analyses.loss_by_digit(epochs_table, split="test", epoch=4)
    rows = table_rows(page, "loss-by-class")[1:]
    assert [r[1] for r in rows] == list(map(str, expected.column("count").to_pylist()))  # 1,000, not 3,000
    assert [r[2] for r in rows] == [f"{v:.2f}" for v in expected.column("loss_mean").to_pylist()]

    dynamics = (out / DYNAMICS_PAGE).read_text()
    assert_figures(out, dynamics, DYNAMICS_FIGURES)
    assert '<a href="index.html">The report</a> shows epoch 4' in dynamics
    learned = analyses.learned_late(epochs_table, within=1.0, split="test", k=8).to_pylist()
    forgotten = analyses.forgotten(epochs_table, by=0.0, split="test", k=8).to_pylist()
    assert len(learned) == len(forgotten) == 8
    shown = table_rows(dynamics, "extremes")
    assert shown[0] == ["group", "key", "digit", "l_i at epoch 1", "l_i at epoch 4", "when"]
    assert [(r[0], r[1]) for r in shown[1:]] == ([("learned latest", r["key"]) for r in learned]
                                                 + [("most forgotten", r["key"]) for r in forgotten])
    assert shown[9][5] == (f"+{forgotten[0]['rise']:.2f} nats from epoch {forgotten[0]['from_epoch']} "
                           f"to {forgotten[0]['to_epoch']}")
    assert shown[1][3:5] == [f"{learned[0]['loss_first']:.2f}", f"{learned[0]['loss_final']:.2f}"]


def test_a_chosen_epoch_uses_its_checkpoint(epochs_table, tmp_path):
    page = Path(write_report(epochs_table, str(tmp_path / "out"), num_examples=4, epoch=2)).read_text()
    assert "of epoch 2 (chosen with epoch=)" in page
    assert f"<li>checkpoint: <code>{read_lineage(epochs_table).checkpoints[1]['path']}</code></li>" in page
    expected = analyses.loss_by_digit(epochs_table, split="test", epoch=2).column("loss_mean").to_pylist()
    assert [r[2] for r in table_rows(page, "loss-by-class")[1:]] == [f"{v:.2f}" for v in expected]


def test_bad_epochs_are_refused(epochs_table, latent_tables, tmp_path):
    with pytest.raises(QueryError, match=r"epoch 3 is not in latent table .*; it holds epochs 1, 2, 4"):
        write_report(epochs_table, str(tmp_path / "out"), epoch=3)
    with pytest.raises(QueryError, match=r"has no epoch column \(it encodes one checkpoint\); leave out epoch=1"):
        write_report(latent_tables["latents"], str(tmp_path / "out"), epoch=1)
    # A lineage that names only the last checkpoint (no `checkpoints` list) cannot show another epoch.
    copy = tmp_path / "copy"
    shutil.copytree(epochs_table, copy)
    lineage = json.loads((copy / schema.LINEAGE_FILE).read_text())
    del lineage["checkpoints"]
    (copy / schema.LINEAGE_FILE).write_text(json.dumps(lineage))
    with pytest.raises(QueryError, match=r"_lineage.json names no checkpoint of epoch 2; give one explicitly"):
        write_report(str(copy), str(tmp_path / "out"), epoch=2)


# ---------------------------------------------------------------------------------------------
# comparison.html

def test_comparison_page(latent_tables, other_table, tmp_path):
    a, b = latent_tables["latents"], other_table
    outs = [Path(write_comparison(a, b, str(tmp_path / name), num_examples=6)).parent for name in ("x", "y")]
    assert_same_files(*outs)
    out = outs[0]
    assert sorted(p.name for p in out.iterdir()) == sorted([COMPARISON_PAGE, *COMPARISON_FIGURES])
    page = (out / COMPARISON_PAGE).read_text()
    assert_figures(out, page, COMPARISON_FIGURES)
    assert f"<li>A: <code>{a}</code></li>" in page and f"<li>B: <code>{b}</code></li>" in page
    # Δl_i recomputed with pandas from the published rows of the test split.
    rows_a, rows_b = (pd.read_parquet(t).query("split == 'test'").set_index("key") for t in (a, b))
    delta = (rows_a.loss - rows_b.loss.reindex(rows_a.index)).groupby(rows_a.label)
    by_class = table_rows(page, "compare-by-class")
    assert by_class[0] == ["label", "count", "mean l_i(A)", "mean l_i(B)", "mean Δl_i ± s.e.", "improved"]
    assert [r[4] for r in by_class[1:]] == [f"{d.mean():.2f} ± {d.std() / np.sqrt(len(d)):.2f}" for _, d in delta]
    assert [r[5] for r in by_class[1:]] == [f"{(d < 0).mean():.1%}" for _, d in delta]
    top = analyses.compare_top(a, b, k=6, split="test").to_pylist()
    assert [(r[0], r[1], r[5]) for r in table_rows(page, "compare-top")[1:]] == [
        (r["change"], r["key"], f"{r['delta']:+.2f}") for r in top]
    assert "<h2>Lineage of A</h2>" in page and "another checkpoint" in page


def test_comparison_of_two_epochs_of_one_table(epochs_table, tmp_path):
    page = Path(write_comparison(epochs_table, epochs_table, str(tmp_path / "out"), epoch=4,
                                 against_epoch=1)).read_text()
    assert f"<li>A: <code>{epochs_table} at epoch 4</code></li>" in page
    assert f"<li>B: <code>{epochs_table} at epoch 1</code></li>" in page
    rows = pd.read_parquet(epochs_table)
    last, first = (rows[rows.epoch == e].set_index("key") for e in (4, 1))
    delta = (last.loss - first.loss.reindex(last.index)).groupby(last.label)
    assert [r[4] for r in table_rows(page, "compare-by-class")[1:]] == [
        f"{d.mean():.2f} ± {d.std() / np.sqrt(len(d)):.2f}" for _, d in delta]
    # Without epochs, a table of several checkpoints is compared at its last.
    page = Path(write_comparison(epochs_table, epochs_table, str(tmp_path / "last"))).read_text()
    assert f"<li>A: <code>{epochs_table} at epoch 4</code></li>" in page
    assert {r[5] for r in table_rows(page, "compare-by-class")[1:]} == {"0.0%"}


def test_comparison_refuses_tables_of_other_data(latent_tables, fashion_table, tmp_path):
    with pytest.raises(QueryError, match="cannot compare latent tables .* not encoded from the same datapoints"):
        write_comparison(fashion_table, latent_tables["latents"], str(tmp_path / "out"))
    with pytest.raises(QueryError, match=r"neither .* nor .* has an epoch column"):
        write_comparison(latent_tables["latents"], latent_tables["latents_k0"], str(tmp_path / "out"), epoch=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, code, message", [
    ([], 0, "wrote {out}/comparison.html"),
    (["--against-epoch", "1"], 1, "latent table {b} has no epoch column"),
])
def test_report_cli_compares(latent_tables, other_table, tmp_path, extra, code, message):
    out, b = tmp_path / "out", other_table
    result = CliRunner().invoke(cli, ["report", "--latents", latent_tables["latents"], "--against", b,
                                      "--out", str(out), *extra])
    assert result.exit_code == code, result.output
    assert message.format(out=out, b=b) in result.output and "Traceback" not in result.output


def test_report_cli_errors_are_clean(latent_tables, fashion_table, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["report", "--latents", fashion_table, "--against", latent_tables["latents"],
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.startswith("Error: cannot compare latent tables"), result.output
    result = runner.invoke(cli, ["report", "--latents", latent_tables["latents"], "--against-epoch", "2",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--against-epoch needs --against" in result.output


# ---------------------------------------------------------------------------------------------
# Datasets other than MNIST.

def test_report_of_a_dataset_with_class_names(fashion_table, tmp_path):
    out = Path(write_report(fashion_table, str(tmp_path / "out"), num_examples=8)).parent
    page = (out / "index.html").read_text()
    assert_figures(out, page, INDEX_FIGURES)
    text = text_of(page)
    assert "digit" not in text.lower()  # named classes throughout; "digit" only in file names
    assert "Loss per class" in text and "Highest-loss images" in text and "Evidence gap per class" in text
    assert "<li>dataset: <code>fashion-mnist, images 28x28x1</code></li>" in page
    rows = table_rows(page, "loss-by-class")
    assert rows[0][:3] == ["label", "class", "count"]
    assert [r[1] for r in rows[1:]] == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                        "Sneaker", "Bag", "Ankle boot"]
    assert table_rows(page, "outliers")[0][2] == "class"


@pytest.mark.parametrize("shape", [(4, 6, 1), (6, 4, 3)])
def test_image_grid_draws_any_image_shape(shape):
    from PIL import Image

    h, w, c = shape
    image = np.zeros((h, w, c), np.uint8)
    image[: h // 2] = 255 if c == 1 else (255, 0, 0)  # top half white (grey) or red (RGB)
    fig = report._image_grid([image.reshape(-1), None], ["a", ""], 255.0, shape)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=report.DPI)
    pixels = np.asarray(Image.open(buf).convert("RGB")).reshape(-1, 3).astype(int)
    red = ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum()
    white_and_black = ((pixels == 255).all(axis=1).sum(), (pixels == 0).all(axis=1).sum())
    if c == 3:
        assert red > 100  # colour, not grey
    else:
        assert red == 0 and min(white_and_black) > 100
    with pytest.raises(ValueError):  # the wrong number of pixels for the shape is not drawn as something
        report._image_grid([np.zeros(h * w * c + 1, np.uint8)], ["a"], 255.0, shape)


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
    assert set(re.findall(r'src="([^"]+)"', page)) == {*INDEX_FIGURES, TRAINING_FIGURE}
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
    assert not (out / TRAINING_FIGURE).exists() and set(re.findall(r'src="([^"]+)"', page)) == set(INDEX_FIGURES)


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
