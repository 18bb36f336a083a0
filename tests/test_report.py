"""`lance-ray report`: the page of a real run (local Ray, debug backend: every kind of input and output), opened
in headless Chromium (Debian's `chromium`, driven by Playwright): a screenshot, and what the page shows
checked against the run's Parquet output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lance_ray.cli import main
from lance_ray.pipeline.sinks import read_step_output

CHROMIUM = "/usr/bin/chromium"
# Flags that work as root on a machine without network or GPU (see .ci/run).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = ("draw", "describe", "animate", "watch")


def _job(tmp_path: Path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"""
name: reported
models:
  image: {{source: lance-tiny, backend: debug}}
  video: {{source: lance-tiny, backend: debug}}
output: {tmp_path / 'out'}
steps:
  - name: draw
    task: t2i
    input: {{rows: [{{prompt: a red kite}}, {{prompt: a blue boat}}, {{prompt: ""}}, {{prompt: a green hill}}]}}
    params: {{height: 64, width: 96, seed: 7}}
  - name: describe
    task: x2t_image
    input: {{from_step: draw, prompt: "What is in the picture?"}}
  - name: animate
    task: t2v
    input: {{rows: [{{prompt: waves at night}}]}}
    params: {{height: 64, width: 96, frames: 9, fps: 6}}
  - name: watch
    task: x2t_video
    input: {{path: {REPO_ROOT / 'datasets' / 'videos'}, limit: 2}}
""")
    return job


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium), as .ci/run does")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.mark.usefixtures("ray_local")
def test_report_of_a_run_in_a_real_browser(tmp_path: Path, browser, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(_job(tmp_path)), "--no-progress"]) == 1  # the empty prompt fails its row
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out")]) == 0
    page_path = Path(capsys.readouterr().out.strip())
    assert page_path.name == "report.html" and page_path.parent.parent == tmp_path / "out" / "_runs"
    outputs = {step: read_step_output(str(tmp_path / "out" / step)).to_pylist() for step in STEPS}

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(page_path.as_uri())
    page.wait_for_function("[...document.querySelectorAll('img.thumb')].every(i => i.complete)")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    shutil.copy(tmp_path / "report.png", page_path.with_suffix(".png"))  # beside the page, for a person to look at

    # The header: every step with this run's counts, as in the Parquet output.
    header = {row[0]: row for row in page.eval_on_selector_all(
        "table.steps tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")}
    assert list(header) == list(STEPS)
    for step, rows in outputs.items():
        ok = sum(r["error"] is None for r in rows)
        assert (int(header[step][3]), int(header[step][4])) == (ok, len(rows) - ok), step
        assert float(header[step][6]) > 0  # rows/s
    assert header["draw"][4] == "1"

    # One card per committed row; every thumbnail decoded.
    cards = page.locator(".card")
    assert cards.count() == sum(len(rows) for rows in outputs.values())
    sizes = page.eval_on_selector_all("img.thumb", "imgs => imgs.map(i => i.naturalWidth)")
    assert sizes and all(width > 0 for width in sizes)

    # Each caption beside its input image (the image drawn by the step before).
    for row in outputs["describe"]:
        card = page.locator(f".card[data-step='describe'][data-row-id='{row['row_id']}']")
        assert card.locator(".input img.thumb").count() == 1
        assert card.locator(".result .text").inner_text() == row["text"]
        assert card.locator(".prompt").inner_text() == "What is in the picture?"

    # Videos: a poster frame and a clip the browser can play, for a generated video and for a video input.
    animate = page.locator(".card[data-step='animate'] .result video")
    watch = page.locator(".card[data-step='watch'] .input video")
    assert animate.count() == 1 and watch.count() == 2
    for video in (animate.first, watch.first):
        assert video.get_attribute("poster").startswith("data:image/jpeg;base64,")
        video.evaluate("v => v.play()")
        page.wait_for_function("v => v.readyState >= 2 && v.currentTime > 0", arg=video.element_handle())
        assert video.evaluate("v => v.videoWidth") > 0 and video.evaluate("v => v.error") is None

    # Failed rows, filtered, with their errors.
    page.click("#filters button[data-status='failed']")
    visible = page.locator(".card:not([hidden])")
    failed = [r for rows in outputs.values() for r in rows if r["error"]]
    assert visible.count() == len(failed) == 1
    assert visible.first.locator(".error").inner_text() == failed[0]["error"]
    assert page.locator("#shown").inner_text() == "1"
    page.screenshot(path=str(page_path.with_name("report-failed.png")))
    page.click("#filters button[data-status='all']")

    # One step.
    page.select_option("#step", "watch")
    assert page.locator(".card:not([hidden])").count() == 2
    assert page.locator("section.step:not([hidden])").count() == 1
    page.select_option("#step", "")

    # The detail view: params and seed of the row.
    row = next(r for r in outputs["draw"] if r["error"] is None)
    page.click(f".card[data-step='draw'][data-row-id='{row['row_id']}'] .meta")
    dialog = page.locator("dialog#detail")
    assert dialog.evaluate("d => d.open")
    assert json.loads(dialog.locator("pre.params").inner_text()) == json.loads(row["params"])
    assert json.loads(row["params"])["seed"] == 7
    facts = dict(zip(dialog.locator("th").all_inner_texts(), dialog.locator("td").all_inner_texts(), strict=True))
    assert facts["seed"] == str(row["seed"]) and facts["row id"] == row["row_id"]
    page.screenshot(path=str(page_path.with_name("report-detail.png")))
    page.close()


def test_report_refuses_what_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished lance-ray run" in capsys.readouterr().err
