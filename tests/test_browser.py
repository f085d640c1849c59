"""The Head atlas in a real browser: Debian's chromium driven by Playwright renders the heatmap and the CircuitsVis view.

With `HEADLAB_SCREENSHOT=1` the test also writes the atlas as the user sees it to `docs/atlas.png`.
"""
import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

import headlab as hl
from headlab.heads import head_label

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "atlas.png"
N = 8
SLOW_MS = 120_000  # scoring on a 2-core CPU, with the queue and the browser sharing it


@pytest.fixture()
def page():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's chromium; run `apt-get install -y chromium` (as root).")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        # Tall enough that the whole atlas, pattern iframe included, is on screen: Chromium does not
        # paint off-screen iframes.
        page = browser.new_page(viewport={"width": 1400, "height": 2700})
        try:
            yield page
        finally:
            browser.close()


def save_screenshot(page: Page, path: Path) -> None:
    """The page down to the pattern view, as one picture (the viewport is already that tall: a
    `full_page` capture beyond the viewport, or a resize, leaves the iframe's charts unpainted)."""
    page.wait_for_timeout(1500)  # let chart.js finish drawing
    box = page.locator("#atlas-pattern").bounding_box()
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": page.viewport_size["width"], "height": box["y"] + box["height"] + 24})


def open_atlas(page: Page, url: str) -> None:
    """Open the app on the Head atlas tab once its start-up view (a stored run, if any) has arrived,
    so that view cannot overwrite what the test types next."""
    page.goto(url)
    page.get_by_role("tab", name="Head atlas").click()
    expect(page.locator("#atlas-status")).to_contain_text(re.compile("No stored|Best head"), timeout=SLOW_MS)


def score_induction(page: Page, n: int) -> None:
    """Score induction heads (the atlas's default kind) on `n` samples, ignoring stored runs."""
    expect(page.locator("#atlas-kind input")).to_have_value("induction")
    page.locator("#atlas-n input").fill(str(n))
    page.locator("#atlas-recompute input").check()  # computed now, not the start-up view from the store
    page.locator("#atlas-score").click()


def test_atlas_shows_heatmap_top_heads_and_circuitsvis_pattern(page: Page, app_url: str, lab):
    open_atlas(page, app_url)
    score_induction(page, N)

    heatmap = page.locator("#atlas-heatmap")
    expect(page.locator("#atlas-status")).to_contain_text("computed in", timeout=SLOW_MS)
    best = head_label(*hl.score(lab, "induction", n=N, seed=0).top_heads(1)[0])
    expect(page.locator("#atlas-status")).to_contain_text(best)
    expect(heatmap.locator(".plotly svg.main-svg").first).to_be_visible(timeout=SLOW_MS)
    expect(heatmap.locator(".hm, .heatmaplayer").first).to_be_attached()
    expect(page.locator("#atlas-top")).to_contain_text(best)

    view = page.frame_locator("#atlas-pattern iframe")
    expect(view.get_by_text(f"{best} Zoomed")).to_be_visible(timeout=SLOW_MS)
    expect(view.locator("canvas").first).to_be_visible()
    assert view.locator("canvas").count() >= lab.info.n_heads  # one thumbnail per head of the layer

    if os.environ.get("HEADLAB_SCREENSHOT") == "1":
        save_screenshot(page, SCREENSHOT)

    # Clicking the second row of the top table shows that head's pattern.
    head_cell = page.locator("#atlas-top [data-testid='cell-1-1']")
    second = head_cell.inner_text().strip()
    head_cell.click()
    expect(page.locator("#atlas-head input, #atlas-head textarea")).to_have_value(second, timeout=SLOW_MS)
    expect(view.get_by_text(f"{second} Zoomed")).to_be_visible(timeout=SLOW_MS)


def test_bad_head_shows_an_error_in_the_page(page: Page, app_url: str):
    open_atlas(page, app_url)
    head = page.locator("#atlas-head input, #atlas-head textarea")
    head.fill("40.2")
    head.press("Tab")  # commit the typed value before the click reads it
    expect(head).to_have_value("40.2")
    page.locator("#atlas-show").click()
    expect(page.get_by_text(re.compile(r"Head 40.2 does not exist")).first).to_be_visible(timeout=SLOW_MS)
