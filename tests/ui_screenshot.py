"""Open a flow run in the Prefect UI with headless Chromium and screenshot its report.

Debian's chromium, driven by Playwright with ``executable_path``: Playwright's
own browser download cannot work offline. Used by the browser test.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google's
# hosts, which a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# each state badge on the page: its text and its colour class (state--completed, state--failed, ...)
STATE_BADGES = ("() => [...document.querySelectorAll('.state-badge')].map(b => [b.innerText.trim(),"
                " [...b.classList].find(c => c.startsWith('state--')) || ''])")


@contextmanager
def browser_page(width: int, height: int, timeout_ms: int) -> Iterator[Any]:
    """A page in headless Debian chromium, closed with its browser after the block."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def open_report_artifact(page: Any, url: str, path: Path) -> None:
    """The run's Artifacts tab, then the report. Loaded twice at most: on a busy machine the UI
    can miss its first artifacts query and does not ask again until the page is reloaded."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in (1, 2):
        page.goto(url)
        try:
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("mnist-report", exact=True).last.click(timeout=45_000)
            return
        except PlaywrightTimeout:
            page.screenshot(path=str(path.with_name(f"failed-{attempt}-{path.name}")), full_page=True)
            if attempt == 2:
                raise


def screenshot_report(ui: str, flow_run_id: str, path: Path, timeout_ms: int = 60_000) -> dict[str, Any]:
    """Open the run, go to its Artifacts tab, open the report artifact, and save a full-page
    screenshot. Returns the page text and how many plot images actually loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with browser_page(1400, 1000, timeout_ms) as page:
        open_report_artifact(page, f"{ui}/runs/flow-run/{flow_run_id}", path)
        page.get_by_text("MNIST training run").first.wait_for()
        return whole_page(page, path)


def whole_page(page: Any, path: Path, width: int = 1400) -> dict[str, Any]:
    """Once its embedded plots have loaded, the page in one screenshot; its text, how many plots
    loaded, and the state types its state badges show (``state--failed`` is the red badge)."""
    page.wait_for_function("() => [...document.images].filter(i => i.src.startsWith('data:image/png'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    # The UI scrolls inside an inner element, so a full-page shot would stop at the
    # viewport: grow the viewport to the content instead.
    height = page.evaluate("() => Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))")
    page.set_viewport_size({"width": width, "height": min(int(height) + 100, 8000)})
    page.wait_for_timeout(500)
    page.screenshot(path=str(path), full_page=True)
    plots_loaded = page.evaluate("() => [...document.images].filter(i => i.src.startsWith('data:image/png')"
                                 " && i.naturalWidth > 0).length")
    badges = page.evaluate(STATE_BADGES)
    return {"text": page.inner_text("body"), "plots_loaded": plots_loaded, "url": page.url, "badges": badges}


def screenshot_artifact(ui: str, key: str, expect: str, path: Path, timeout_ms: int = 60_000) -> dict[str, Any]:
    """The newest artifact of ``key`` as a person finds it: Artifacts, the key, its newest entry
    (the top of the key's timeline); once ``expect`` shows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with browser_page(1400, 1000, timeout_ms) as page:
        page.goto(f"{ui}/artifacts/key/{key}")
        page.locator("a[href*='/artifacts/artifact/']").first.click()
        page.get_by_text(expect).first.wait_for()
        return whole_page(page, path)


def open_links(links: list[str], expect: str, timeout_ms: int = 60_000) -> dict[str, str]:
    """Open each link as a person would and return the text each page shows once ``expect`` is on it."""
    opened = {}
    with browser_page(1400, 1000, timeout_ms) as page:
        for link in links:
            page.goto(link)
            page.get_by_text(expect).first.wait_for()
            opened[link] = page.inner_text("body")
    return opened


def screenshot_runs_list(ui: str, run_names: list[str], path: Path,
                         timeout_ms: int = 60_000) -> tuple[str, list[list[str]]]:
    """The Prefect UI's runs list once every named run shows in it; a screenshot, its text and its state badges."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with browser_page(1600, 1200, timeout_ms) as page:
        page.goto(f"{ui}/runs")
        for name in run_names:
            page.get_by_text(name).first.wait_for()
        page.wait_for_timeout(500)
        page.screenshot(path=str(path), full_page=True)
        return page.inner_text("body"), page.evaluate(STATE_BADGES)
