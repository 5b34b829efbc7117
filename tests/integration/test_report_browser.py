"""The report in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright
loads its pages over HTTP from a local server, as someone would open a published report.

The report is built from real artefacts: the session's trained run (conftest.trained_run, trained
with train.num_samples_iw_final, so its metrics.jsonl has epoch rows and a final NLL row); the encode
job's table of that run's checkpoint; then `write_report`. Beside it, without another
training or encode job: a table of the run's two checkpoints (conftest.write_latent_table), whose
report has dynamics.html, and comparison.html of the encoded table against that table's first epoch.

Served over http://127.0.0.1 rather than opened as file://: every request then has a status, so a
broken link shows up as a 404 response (file:// has none), and the page loads as it would from any
web server the report directory is copied to.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import start_local_ray

CHROMIUM = "/usr/bin/chromium"
# As the machine notes say for a closed network: without the background-networking flags Chromium
# keeps trying to reach Google's hosts; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# naturalWidth alone is no proof of decoding: Chromium reads it from the PNG's header, and gives it
# (and resolves img.decode()) for a file cut short after that. So each image is also drawn onto a
# canvas and its share of opaque pixels read back; a truncated PNG draws nothing. (Reading a canvas
# back needs a same-origin image: one more reason to serve over HTTP, where file:// taints it.)
DECODED_IMAGES_JS = """els => els.map(e => {
    const canvas = document.createElement("canvas");
    canvas.width = e.naturalWidth;
    canvas.height = e.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(e, 0, 0);
    const pixels = e.naturalWidth ? context.getImageData(0, 0, e.naturalWidth, e.naturalHeight).data : [];
    let opaque = 0;
    for (let k = 3; k < pixels.length; k += 4) opaque += pixels[k] === 255;
    return {src: e.getAttribute("src"), complete: e.complete, width: e.naturalWidth, height: e.naturalHeight,
            opaque: pixels.length ? opaque / (pixels.length / 4) : 0};
})"""

pytestmark = pytest.mark.integration

if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not installed ({CHROMIUM} missing): apt-get install chromium (make test does, as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def report(ray_cluster, trained_run, tmp_path_factory):
    """(the directory served, the finished run's TrainResult, the encoded table's path, the table of
    the run's checkpoints). The directory holds report/ (index.html and comparison.html) and epochs/
    (index.html and dynamics.html of the table of checkpoints)."""
    from conftest import write_latent_table
    from vaedist.checkpoint import checkpoint_dirs, load_model
    from vaedist.config import config_from_dict
    from vaedist.encode import encode
    from vaedist.analyses import read_lineage
    from vaedist.report import write_comparison, write_report
    if not ray_cluster.is_initialized():  # a module with a cluster of its own shut the shared one down
        start_local_ray()
    finished_cfg, finished = trained_run  # its final importance-weighted NLL is in the report
    assert finished.final is not None
    # The test split only, no log p(x): all the report draws on, at the least encoding time.
    encode_cfg = config_from_dict(finished_cfg.to_dict(), ["encode.splits=[test]", "encode.num_samples_iw=0",
                                                           "encode.concurrency=1"])
    table = encode(encode_cfg, checkpoint=finished.latest_checkpoint,
                   out=str(tmp_path_factory.mktemp("latents") / "table")).path
    # The run's checkpoints (epochs 0 and 1) in one table, written in this process as encode would.
    checkpoints = [(epoch, f"{directory}/checkpoint.pt") for epoch, directory in checkpoint_dirs(finished.run_dir)]
    assert [epoch for epoch, _ in checkpoints] == [0, 1]
    lineage = {**read_lineage(table).to_dict(), "checkpoint": checkpoints[-1][1],
               "checkpoints": [{"epoch": epoch, "path": path} for epoch, path in checkpoints]}
    epochs_table = write_latent_table(tmp_path_factory.mktemp("latents") / "epochs", finished_cfg.data.shards_dir,
                                      {epoch: load_model(path)[0] for epoch, path in checkpoints}, lineage,
                                      num_samples_iw=0, splits=("test",))
    served = tmp_path_factory.mktemp("served")
    write_report(table, str(served / "report"), num_examples=8)
    write_comparison(table, epochs_table, str(served / "report"), against_epoch=0)
    write_report(epochs_table, str(served / "epochs"), num_examples=8)
    return served, finished, table, epochs_table


@pytest.fixture
def served(report):
    """http://127.0.0.1:<free port>/ serving the report's directory from a thread."""
    directory = report[0]

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest's output to failures
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium with a fresh, empty profile."""
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"), executable_path=CHROMIUM,
                                                       headless=True, args=CHROMIUM_ARGS,
                                                       viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


def watched_page(browser) -> tuple[Any, dict[str, list[str]]]:
    """A new page and the problems it meets: console errors, page errors, failed requests, HTTP errors."""
    page = browser.new_page()
    page.set_default_timeout(30_000)
    problems: dict[str, list[str]] = {"console": [], "page": [], "failed": [], "status": []}
    page.on("console", lambda m: problems["console"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems["page"].append(str(e)))
    page.on("requestfailed", lambda r: problems["failed"].append(f"{r.url}: {r.failure}"))
    page.on("response", lambda r: problems["status"].append(f"{r.url}: {r.status}") if r.status >= 400 else None)
    return page, problems


def check_rendered(page, problems: dict[str, list[str]], figures, screenshot: Path) -> None:
    """No problems, no overflow, every figure decoded whole and nothing else shown, not blank."""
    from PIL import Image

    images = page.eval_on_selector_all("img", DECODED_IMAGES_JS)
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    page.screenshot(path=str(screenshot), full_page=True)
    assert not any(problems.values()), problems
    assert overflow <= 0, f"the page is {overflow} px wider than the window (a long line that does not wrap?)"
    assert sorted(i["src"] for i in images) == sorted(figures)
    for image in images:  # matplotlib's PNGs are opaque
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
        assert image["opaque"] > 0.99, image
    picture = Image.open(screenshot).convert("RGB")
    colours = picture.getcolors(maxcolors=1 << 24)
    non_white = sum(n for n, c in colours if c != (255, 255, 255)) / (picture.width * picture.height)
    assert len(colours) > 100 and non_white > 0.05, (screenshot.name, len(colours), non_white)


def test_report_renders_in_chromium(report, served, browser, tmp_path):
    from PIL import Image

    from vaedist.analyses import loss_by_digit
    from vaedist.report import DIAGNOSTIC_FIGURES, FIGURES, TRAINING_FIGURE

    _, finished, table, _ = report
    page, problems = watched_page(browser)
    response = page.goto(served + "report/index.html", wait_until="load")
    assert response is not None and response.status == 200
    header = page.locator("table.loss-by-class tr th").all_inner_texts()
    rows = [row.locator("td").all_inner_texts() for row in page.locator("table.loss-by-class tr").all()[1:]]
    lineage = json.loads(page.locator("h2:text-is('Lineage') + pre").inner_text())
    training_caption = page.locator(f"figure:has(img[src='{TRAINING_FIGURE}']) figcaption").inner_text()
    final_text = page.locator("p.final-nll").inner_text()
    outliers = page.locator("table.outliers tr").count()
    # Every figure, the diagnostics' and the training curves included.
    check_rendered(page, problems, [*FIGURES, *DIAGNOSTIC_FIGURES, TRAINING_FIGURE], tmp_path / "report.png")

    # The loss-by-digit table is the query's result, one row per digit of the test split.
    expected = loss_by_digit(table, split="test")
    assert header == expected.column_names
    assert [int(r[0]) for r in rows] == expected.column("label").to_pylist() == list(range(10))
    assert sum(int(r[1]) for r in rows) == 4000
    assert outliers == 1 + 8  # a header and num_examples class-relative outliers
    # The lineage is the encode job's, naming the run's checkpoint the curves come from.
    assert lineage["checkpoint"] == f"{finished.latest_checkpoint}/checkpoint.pt"
    assert f"over {len(finished.epochs)} epochs" in training_caption
    final = finished.final
    assert final_text.startswith(f"Importance-weighted test NLL after training: {final['test_nll_iw']:.2f} nats "
                                 f"(K = 8 importance samples, {final['test_count']:,} test datapoints")
    # Not blank: a full page of text, figures and colours.
    picture = Image.open(tmp_path / "report.png")
    assert picture.width == 1280 and picture.height > 2000, picture.size


def test_comparison_and_dynamics_render_in_chromium(report, served, browser, tmp_path):
    from vaedist.report import COMPARISON_FIGURES, DIAGNOSTIC_FIGURES, DYNAMICS_FIGURES, DYNAMICS_PAGE, FIGURES

    _, _, table, epochs_table = report
    page, problems = watched_page(browser)
    assert page.goto(served + "report/comparison.html", wait_until="load").status == 200
    assert page.locator("li").all_inner_texts()[:2] == [f"A: {table}", f"B: {epochs_table} at epoch 0"]
    assert page.locator("table.compare-by-class tr").count() == 1 + 10
    assert page.locator("table.compare-top tr").count() > 1
    check_rendered(page, problems, COMPARISON_FIGURES, tmp_path / "comparison.png")

    # The table of checkpoints: its report says which epoch it shows and links to the dynamics page.
    page, problems = watched_page(browser)
    assert page.goto(served + "epochs/index.html", wait_until="load").status == 200
    assert page.locator("p.epoch-note").inner_text().startswith(
        "This table encodes 2 checkpoints of one run (epochs 0, 1). The figures and tables on this page are of "
        "epoch 1 (the last)")
    check_rendered(page, problems, [*FIGURES, *DIAGNOSTIC_FIGURES, "training.png"], tmp_path / "epochs.png")
    page.locator(f"p.epoch-note a[href='{DYNAMICS_PAGE}']").click()
    page.wait_for_load_state("load")
    assert page.url == served + "epochs/" + DYNAMICS_PAGE
    assert page.locator("table.extremes tr").count() == 1 + 16  # 8 learned latest and 8 most forgotten
    check_rendered(page, problems, DYNAMICS_FIGURES, tmp_path / "dynamics.png")
