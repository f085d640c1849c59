"""The app's linked views in a real browser (Debian's chromium driven by Playwright): a page opened while another
visitor's job runs shows its stored atlas at once, a heatmap click shows that head's pattern, and a link opens a head;
the other tabs' heatmaps and tables link the same way (a click on the Channels pair map picks a pair, one on a
Compare models map shows that head in both models); a result whose inputs changed (also while its job ran) or whose
job failed is marked stale, and errors do not pile up.

With `HEADLAB_SCREENSHOT_DIR=folder` the tests also save what the user sees there.
"""
import os
import re
import time
from pathlib import Path

import importlib

from gradio_client import Client
from playwright.sync_api import Page, expect
from test_browser import page  # noqa: F401  (the chromium page fixture: one browser set-up for all browser tests)

from headlab.circuits.composition import stored_map
from headlab.heads import head_label

FIRST_VIEW_MS = 5_000
SLOW_MS = 120_000
LONG_JOB = ("induction", 512, 11, True)  # /score recomputed on 512 samples: a minute or more on this CPU


def screenshot(page: Page, name: str) -> None:
    folder = os.environ.get("HEADLAB_SCREENSHOT_DIR")
    if folder:
        page.wait_for_timeout(1500)
        page.screenshot(path=str(Path(folder) / f"{name}.png"))


def cell_center(page: Page, layer: int, head: int, n_layers: int, n_heads: int, heatmap: str = "atlas-heatmap") -> tuple[float, float]:
    """Where heatmap cell (layer, head) is on the page: heads on x, layer 0 at the bottom (of a subplot figure, the first
    subplot's). On a pair map a layer is a sender's row and a head a receiver's column."""
    page.locator(f"#{heatmap}").scroll_into_view_if_needed()
    box = page.locator(f"#{heatmap} .nsewdrag").first.bounding_box()
    return box["x"] + (head + 0.5) / n_heads * box["width"], box["y"] + (1 - (layer + 0.5) / n_layers) * box["height"]


def test_a_page_opened_during_a_job_shows_the_atlas_and_a_heatmap_click_shows_that_head(page: Page, app_url: str, lab):
    runner = Client(app_url, verbose=False)
    job = runner.submit(*LONG_JOB, api_name="/score")  # another visitor's long job
    try:
        time.sleep(3)  # it is running
        started = time.monotonic()
        page.goto(app_url + "?tab=atlas")
        expect(page.locator("#atlas-status")).to_contain_text("read from the store", timeout=FIRST_VIEW_MS)
        assert time.monotonic() - started < FIRST_VIEW_MS / 1000
    finally:
        runner.predict(api_name="/cancel")
    expect(page.locator("#atlas-heatmap .nsewdrag").first).to_be_visible(timeout=SLOW_MS)
    page.mouse.click(*cell_center(page, 17, 3, lab.info.n_layers, lab.info.n_heads))
    expect(page.locator("#atlas-head input, #atlas-head textarea")).to_have_value("L17H3", timeout=SLOW_MS)
    expect(page.locator("#atlas-details")).to_contain_text("L17H3")
    expect(page.frame_locator("#atlas-pattern iframe").get_by_text("L17H3 Zoomed")).to_be_visible(timeout=SLOW_MS)
    assert "head=L17H3" in page.url  # the address now links to this head
    screenshot(page, "atlas-click")


def test_a_link_opens_its_tab_kind_and_head(page: Page, app_url: str):
    page.goto(app_url + "?tab=atlas&kind=previous_token&head=16.0")
    expect(page.get_by_role("tab", name="Head atlas")).to_have_attribute("aria-selected", "true", timeout=SLOW_MS)
    expect(page.locator("#atlas-status")).to_contain_text("previous_token", timeout=SLOW_MS)
    expect(page.locator("#atlas-head input, #atlas-head textarea")).to_have_value("L16H0")
    expect(page.frame_locator("#atlas-pattern iframe").get_by_text("L16H0 Zoomed")).to_be_visible(timeout=SLOW_MS)
    expect(page.locator("#atlas-details")).to_contain_text(re.compile(r"L16H0.*rank 1 of"))


def head_box(page: Page, tab: str):
    return page.locator(f"#{tab}-head input, #{tab}-head textarea")


def test_heatmap_cells_and_table_rows_link_a_head_on_the_other_tabs_too(page: Page, app_url: str, lab):
    page.goto(app_url + "?tab=successor")
    expect(page.locator("#successor-heatmap .nsewdrag").first).to_be_visible(timeout=SLOW_MS)
    expect(page.locator("#successor-head-items")).to_contain_text("no result yet")
    page.mouse.click(*cell_center(page, 9, 2, lab.info.n_layers, lab.info.n_heads, "successor-heatmap"))
    expect(head_box(page, "successor")).to_have_value("L9H2", timeout=SLOW_MS)
    expect(page.locator("#successor-details")).to_contain_text(re.compile(r"L9H2: successor -?[0-9.]+, rank \d+ of 270"))
    expect(page.locator("#successor-heatmap .shapelayer path")).to_have_count(1)  # the cell is outlined, and only it
    expect(page.locator("#successor-head-items")).not_to_contain_text("no result yet", timeout=SLOW_MS)  # without "Show head"
    screenshot(page, "successor-click")

    page.get_by_role("tab", name="Retrieval").click()
    second = page.locator("#retrieval-top").get_by_role("row").nth(2)  # the header is row 0
    expect(second).to_contain_text(re.compile(r"^\s*2\b"), timeout=SLOW_MS)
    cell = second.get_by_role("gridcell").nth(1)
    head = cell.inner_text().strip()
    cell.click()
    expect(head_box(page, "retrieval")).to_have_value(head, timeout=SLOW_MS)
    expect(page.locator("#retrieval-details")).to_contain_text(re.compile(rf"{head}: retrieval [0-9.]+, rank 2 of 270"))
    expect(page.locator("#retrieval-heatmap .shapelayer path")).to_have_count(1)


def test_a_result_is_marked_stale_when_its_inputs_change_or_its_job_fails_and_errors_do_not_pile_up(page: Page, app_url: str):
    page.goto(app_url + "?tab=atlas")
    expect(page.locator("#atlas-status")).to_contain_text("read from the store", timeout=SLOW_MS)
    heatmap, n = page.locator("#atlas-heatmap"), page.locator("#atlas-n input")
    expect(heatmap).not_to_have_class(re.compile("headlab-stale"))
    stored_n = n.input_value()
    n.fill("0")  # the visitor changes an input: the shown run no longer answers the form
    expect(heatmap).to_have_class(re.compile("headlab-stale"))
    expect(heatmap).to_have_attribute("data-stale", re.compile("inputs changed"))
    expect(page.locator("#atlas-top")).to_have_class(re.compile("headlab-stale"))
    for _ in range(2):  # two failing jobs: one toast on screen, not a growing pile
        page.locator("#atlas-score").click()
        expect(page.get_by_text("n must be from 1").first).to_be_visible(timeout=SLOW_MS)
    expect(heatmap).to_have_attribute("data-stale", re.compile("failed"))
    expect(heatmap.locator(".error")).to_be_hidden()  # no opaque "Error" badge over the earlier result: it stays readable
    page.wait_for_timeout(500)
    assert page.locator(".toast-body:visible").count() == 1
    screenshot(page, "atlas-stale")
    n.fill(stored_n)
    page.locator("#atlas-score").click()  # the stored run again: read, and current
    expect(heatmap).not_to_have_class(re.compile("headlab-stale"), timeout=SLOW_MS)
    expect(page.locator("#atlas-status")).to_contain_text("read from the store")


def test_a_click_on_the_channel_pair_map_picks_that_pair_and_shows_its_composition(page: Page, app_url: str, lab):
    cmap = stored_map(lab, "k")
    page.goto(app_url + "?tab=channels")
    expect(page.locator("#channels-map-details")).to_contain_text("Click a cell", timeout=SLOW_MS)  # the first view came
    page.locator("#channels-layer-low input").fill("16")
    page.locator("#channels-layer-high input").fill("18")
    page.locator("#channels-map").click()
    expect(page.locator("#channels-map-status")).to_contain_text("16–18", timeout=SLOW_MS)
    side = 3 * lab.info.n_heads  # layers 16-18 on both axes: L16H0 is the bottom row, L18H6 column 2 * 9 + 6
    page.mouse.click(*cell_center(page, 0, 2 * lab.info.n_heads + 6, side, side, "channels-heatmap"))
    expect(page.locator("#channels-sender input, #channels-sender textarea")).to_have_value("L16H0", timeout=SLOW_MS)
    expect(page.locator("#channels-receivers input, #channels-receivers textarea")).to_have_value("L18H6")
    expect(page.locator("#channels-map-details")).to_contain_text(
        f"L16H0 → L18H6, K-composition: score {cmap.score((16, 0), (18, 6)):.3f}", timeout=SLOW_MS)
    expect(page.locator("#channels-heatmap .shapelayer path")).to_have_count(1)  # the cell is outlined, and only it
    screenshot(page, "channels-click")


def test_a_click_on_a_compare_models_map_shows_that_heads_numbers_in_both_models(page: Page, app_url: str, lab):
    shipped = importlib.import_module("headlab.diff").stored_diff("embedded", "embedded-refusal")
    frame, kind = shipped.to_frame().set_index("head"), next(iter(shipped.scores))
    n_layers, n_heads = lab.info.n_layers, lab.info.n_heads
    page.goto(app_url + "?tab=diff")
    expect(page.locator("#diff-summary")).to_contain_text("most changed", timeout=SLOW_MS)
    (layer, head), = shipped.changed_heads(1)
    label, details = head_label(layer, head), page.locator("#diff-details")
    page.mouse.click(*cell_center(page, layer, head, n_layers, n_heads, "diff-weights"))  # its QK cell
    expect(head_box(page, "diff")).to_have_value(label, timeout=SLOW_MS)
    expect(details).to_contain_text(f"{label} (change rank 1 of 270): QK circuit changed by {frame.loc[label, 'qk']:.4f}", timeout=SLOW_MS)
    row = frame.loc[label]
    expect(details).to_contain_text(f"{kind}: {row[f'{kind}_a']:.3f} (rank {int(row[f'{kind}_rank_a'])}) → "  # in A and in B
                                    f"{row[f'{kind}_b']:.3f} (rank {int(row[f'{kind}_rank_b'])})")
    expect(page.locator("#diff-weights .shapelayer path")).to_have_count(1)
    expect(page.locator("#diff-scores .shapelayer path")).to_have_count(1)  # outlined on the score map too
    page.mouse.click(*cell_center(page, 9, 2, n_layers, n_heads, "diff-scores"))  # the score map is linked the same way
    expect(head_box(page, "diff")).to_have_value("L9H2", timeout=SLOW_MS)
    expect(details).to_contain_text(f"L9H2 (change rank {int(frame.loc['L9H2', 'change_rank'])} of 270)", timeout=SLOW_MS)
    screenshot(page, "diff-click")


def test_a_result_is_marked_stale_when_an_input_changes_while_its_job_runs(page: Page, app_url: str):
    page.goto(app_url + "?tab=atlas")
    expect(page.locator("#atlas-status")).to_contain_text("read from the store", timeout=SLOW_MS)
    heatmap, n, seed = page.locator("#atlas-heatmap"), page.locator("#atlas-n input"), page.locator("#atlas-seed input")
    n.fill("32")
    seed.fill("2")
    page.locator("#atlas-recompute input").check()
    page.locator("#atlas-score").click()  # computes for seconds on this CPU ...
    seed.fill("3")  # ... while the visitor edits an input of the job
    expect(page.locator("#atlas-status")).to_contain_text("computed in", timeout=SLOW_MS)
    expect(heatmap).to_have_class(re.compile("headlab-stale"), timeout=SLOW_MS)  # the result answers seed 2, not 3
    expect(heatmap).to_have_attribute("data-stale", re.compile("changed while it ran"))
    expect(page.locator("#atlas-top")).to_have_attribute("data-stale", re.compile("changed while it ran"))
    screenshot(page, "atlas-stale-while-running")
    seed.fill("2")
    page.locator("#atlas-recompute input").uncheck()
    page.locator("#atlas-score").click()  # the run just stored, read with unchanged inputs: current again
    expect(page.locator("#atlas-status")).to_contain_text("read from the store", timeout=SLOW_MS)
    expect(heatmap).not_to_have_class(re.compile("headlab-stale"), timeout=SLOW_MS)
