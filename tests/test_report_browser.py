"""The Snakemake report of a smoke run, opened in a real headless browser (Chromium driven by Playwright): every
result the workflow declares with report() is reachable by clicking through the report's menus and renders
(tables as HTML tables with rows, figures as loaded images, the configuration page with the config), and the
rule graph shows each rule once.

Needs Debian's ``chromium`` (apt-get install -y chromium) and ``playwright`` (the test extra); never
``playwright install``. Without them the test skips, except under CI (environment variable CI set), where it fails.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = Path(os.environ.get("PMOE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 15_000


def require(ok: bool, reason: str) -> None:
    """Skip without the browser locally; fail under CI, which must run this test."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: the browser test must run)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed (pip install -e '.[test]')")
    require(CHROMIUM.is_file(), f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def report(smoke_workdir: Path, run_workflow, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    run_workflow(smoke_workdir, "--report", str(path))
    assert path.is_file() and path.stat().st_size > 100_000
    return path


def expected_results(workdir: Path) -> set[str]:
    """What the run declares with report(): every table's page, every figure, the configuration page."""
    res = workdir / "results"
    files = [*res.glob("tables/*.html"), *res.glob("figures/*.png"), res / "config" / "config.html"]
    return {str(p.relative_to(workdir)) for p in files}


def open_category(page, category: str, subcategory: str, single: bool) -> None:
    """From anywhere: home, the category in the menu, then the subcategory unless the report skips that step."""
    nav = page.locator("nav").first
    nav.locator("ol li a").first.click()  # the breadcrumbs' home
    nav.locator("ul li a", has_text=category).first.click()
    if not single:
        nav.locator("ul li a", has_text=subcategory).first.click()


def check_table_page(frame, path: str) -> None:
    frame.locator("table tbody tr").first.wait_for(timeout=TIMEOUT_MS)
    assert frame.locator("table thead th").count() >= 2, path
    assert frame.locator("table tbody tr").count() >= 1, path
    if "/attacks_" in path:  # beside ours: the paper's values and the differences, styled apart
        assert frame.locator("td.paper").count() > 0 and frame.locator("td.delta").count() > 0, path
        assert frame.locator("td.delta[style*='background']").count() > 0, path


def check_config_page(frame, workdir: Path) -> None:
    frame.locator("h1", has_text="Configuration").wait_for(timeout=TIMEOUT_MS)
    text = frame.locator("body").inner_text()
    assert "Merged configuration" in text and "datasets:" in text and "neural_cleanse:" in text
    assert "smoke.yaml" in text  # the config file given, by path, with its content
    assert (workdir / "results" / "config" / "config.yaml").is_file()


def test_every_report_item_is_reachable_and_renders(browser, report: Path, smoke_workdir: Path):
    t0 = time.perf_counter()
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(report.as_uri())
    page.locator("nav").first.wait_for(timeout=TIMEOUT_MS)

    categories = page.evaluate("() => categories")
    mimes = page.evaluate("() => Object.fromEntries(Object.entries(results).map(([k, v]) => [k, v.mime_type]))")
    expected = expected_results(smoke_workdir)
    assert set(mimes) == expected, f"declared {sorted(mimes)}, on disk {sorted(expected)}"
    assert "Configuration" in categories
    assert all(mimes[p] == ("image/png" if p.endswith(".png") else "text/html") for p in mimes), mimes

    # the workflow page's rule graph: each rule once
    nodes = page.evaluate("() => rulegraph_spec.data.find(d => d.name === 'node-data').values.map(n => n.rule)")
    twice = {rule: n for rule, n in Counter(nodes).items() if n > 1}
    assert not twice, f"rules drawn more than once in the report's rule graph: {twice}"

    seen = set()
    for category, subcategories in sorted(categories.items()):
        for subcategory, paths in sorted(subcategories.items()):
            open_category(page, category, subcategory, single=len(subcategories) == 1)
            nav = page.locator("nav").first
            for path in paths:
                row = nav.locator("tr", has=page.locator("td", has_text=path))
                row.locator("a[type=button]").first.click()  # the eye: show the result
                if path.endswith(".png"):
                    img = page.locator("div.p-3 > img")
                    img.wait_for(timeout=TIMEOUT_MS)
                    page.wait_for_function("() => { const i = document.querySelector('div.p-3 > img');"
                                           " return i && i.complete && i.naturalWidth > 0; }", timeout=TIMEOUT_MS)
                    size = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
                    assert size[0] > 100 and size[1] > 100, (path, size)
                else:
                    page.locator("iframe").wait_for(timeout=TIMEOUT_MS)
                    frame = page.frame_locator("iframe")
                    if path.endswith("config/config.html"):
                        check_config_page(frame, smoke_workdir)
                    else:
                        check_table_page(frame, path)
                seen.add(path)
    assert seen == expected, f"not reached by clicking: {sorted(expected - seen)}"
    assert not errors, errors
    page.close()
    print(f"browser check of {len(seen)} report items: {time.perf_counter() - t0:.1f} s")
