"""The web overview in a real browser: `python -m taps_cl ui` started as its own process on the
sample registry (tests/test_ui.py's), Debian's chromium driven through chromium-driver with
Selenium. The numbers each page shows are checked against the Python API; the task table is
sorted and filtered by clicking, a lineage link followed, a task verified, an image uploaded and
its predictions compared with `Manager.predict`, and the main pages saved as screenshots.

Without chromium, chromium-driver or Selenium the tests skip, except in CI
(TAPS_CL_REQUIRE_SERVERS=1: .ci/run installs the Debian packages), where they fail.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from taps_cl.manager import Manager
from tests.conftest import load_example
from tests.servers import require_or_skip
from tests.test_ui import SAMPLE_BASE, digit_png, sample_home

WAIT = 120  # seconds a page may take (the first base page imports torch for the similarity)


@pytest.fixture(scope="module")
def example():
    return load_example("ui_screenshots")


@pytest.fixture(scope="module")
def browser(example):
    """A headless chromium, or skip (fail in CI) where it cannot be had."""
    for path in (example.CHROMIUM, example.CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            require_or_skip(f"browser tests need Debian's chromium and chromium-driver ({path})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        require_or_skip("browser tests need Selenium (pip install 'taps-cl[test]')")
    driver = example.chromium()
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return sample_home(tmp_path_factory)


@pytest.fixture(scope="module")
def url(example, sample, browser):
    """The URL of `taps-cl ui` serving the sample registry (a real process, stopped after)."""
    with example.running_ui(sample, timeout=WAIT) as address:
        yield address


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def wait_for(driver, selector: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, selector)))


def table_rows(driver) -> list[str]:
    return [row.get_attribute("data-task") for row in by_css(driver, "#task-table tbody tr")
            if row.get_attribute("data-task")]


def cell(driver, task: str, field: str):
    (element,) = by_css(driver, f'#task-table tr[data-task="{task}"] td[data-field="{field}"]')
    return element


def test_registry_page_shows_the_budget_and_counts(browser, url, sample):
    browser.get(url + "/")
    with Manager(sample) as m:
        budget = m.budget(SAMPLE_BASE)
        count = m.count_tasks(SAMPLE_BASE)
    row = f'#bases tr[data-base="{SAMPLE_BASE}"]'
    shown = {td.get_attribute("data-field"): td for td in by_css(browser, f"{row} td")
             if td.get_attribute("data-field")}
    assert shown["total_params"].text == f"{budget.total_params:,}"
    assert shown["finetune_total_params"].text == f"{budget.finetune_total_params:,}"
    assert shown["ratio_to_base"].text == f"{budget.ratio_to_base:.4f}"
    assert shown["tasks"].text == str(count)
    assert "probe logits unchanged" in shown["verification"].text


def test_base_page_numbers_and_a_table_sorted_and_filtered_by_clicking(browser, url, sample):
    browser.get(f"{url}/bases/{SAMPLE_BASE}")
    wait_for(browser, "#task-table")
    with Manager(sample) as m:
        tasks = m.task_summaries(SAMPLE_BASE)
        budget = m.budget(SAMPLE_BASE)
    assert table_rows(browser) == [t.name for t in tasks]
    ratios = {row.name: row.ratio_to_base for row in budget.tasks}
    for t in tasks:
        assert cell(browser, t.name, "params").text == f"{t.task_params:,}"
        assert cell(browser, t.name, "accuracy").text == f"{100 * t.test_accuracy:.2f}"
        assert cell(browser, t.name, "ratio").text == f"{ratios[t.name]:.4f}"
        assert cell(browser, t.name, "layers").text == f"{t.active_layers}/{t.total_layers}"
    assert by_css(browser, "#total-params")[0].get_attribute("data-value") == str(
        budget.total_params)
    # The accuracy heatmap marks derived cells as the CLI does ("~").
    kinds = [c.get_attribute("data-kind") for c in by_css(browser, "svg.accuracy rect.cell")]
    assert "derived" in kinds and "probe" in kinds

    by_size = sorted(tasks, key=lambda t: (t.task_params, t.name))
    by_css(browser, 'th a[data-sort="params"]')[0].click()
    wait_for(browser, 'th a.sorted[data-sort="params"]')
    assert table_rows(browser) == [t.name for t in by_size]
    by_css(browser, 'th a[data-sort="params"]')[0].click()  # again: descending
    wait_for(browser, 'th a.sorted[data-sort="params"]')
    assert "order=desc" in browser.current_url
    assert table_rows(browser) == [t.name for t in reversed(by_size)]

    name = by_css(browser, '#filters input[name="q"]')[0]
    name.clear()
    name.send_keys("p-")
    by_css(browser, "#apply")[0].click()
    wait_for(browser, "#matching")
    # The filter keeps the order chosen before it.
    shown = table_rows(browser)
    assert shown == [t.name for t in reversed(by_size) if "p-" in t.name]
    assert len(shown) == 3 and "q=p-" in browser.current_url
    assert by_css(browser, "#matching")[0].get_attribute("data-value") == "3"


def test_following_lineage_links(browser, url):
    browser.get(f"{url}/bases/{SAMPLE_BASE}")
    wait_for(browser, "svg.lineage")
    (even,) = [a for a in by_css(browser, "svg.lineage a.task") if a.text == "even"]
    even.click()
    wait_for(browser, "#task-facts")
    assert browser.current_url.endswith("/tasks/even")
    assert by_css(browser, "h1")[0].text == "Task even"
    (reader,) = by_css(browser, "#read-by a.reader-link")
    assert reader.text == "odd-fused"
    reader.click()
    wait_for(browser, "#pins")
    assert browser.current_url.endswith("/tasks/odd-fused")
    assert [a.text for a in by_css(browser, "#pins a.read-link")] == ["even"]


def test_task_page_shows_its_artifacts_and_verifies(browser, url, sample):
    browser.get(f"{url}/tasks/p-345")
    wait_for(browser, "#artifact-table")
    with Manager(sample) as m:
        t = m.get_task("p-345")
    shown = {row.get_attribute("data-kind"): row for row in by_css(browser, "#artifact-table tr")
             if row.get_attribute("data-kind")}
    for artifact in (t.artifact, t.probe, t.signature):
        row = shown[artifact.kind]
        assert row.find_element("css selector", '[data-field="sha256"]').text == artifact.sha256
        assert row.find_element("css selector", '[data-field="bytes"]').text == (
            f"{artifact.bytes:,}")
    pinned = {p.sha256 for p in t.depends_on}
    assert len(pinned) == 2 and all(sha in browser.page_source for sha in pinned)
    assert by_css(browser, "#classes")[0].text == ", ".join(t.class_names)
    by_css(browser, "#verify-button")[0].click()
    outcome = wait_for(browser, "#verify-outcome")
    assert outcome.get_attribute("data-verified") == "true"
    assert "verified: interference-free" in outcome.text and "p-345: ok" in outcome.text


def test_try_it_predicts_as_the_python_api(browser, url, sample, tmp_path):
    png = digit_png(tmp_path)
    browser.get(f"{url}/bases/{SAMPLE_BASE}/try")
    wait_for(browser, "#try-form")
    for box in by_css(browser, 'input[name="task"]'):
        if box.get_attribute("value") not in ("even", "p-678", "low-digits") and \
                box.is_selected():
            box.click()
    by_css(browser, "#image")[0].send_keys(str(png))
    by_css(browser, "#try-button")[0].click()
    wait_for(browser, "#results")
    tables = by_css(browser, "table.prediction")
    assert [t.get_attribute("data-task") for t in tables] == ["low-digits", "even", "p-678"]
    with Manager(sample) as m:
        for table in tables:
            (expected,) = m.predict(table.get_attribute("data-task"), [str(png)], top_k=3,
                                    device="cpu")
            classes = [td.text for td in table.find_elements("css selector",
                                                               '[data-field="class"]')]
            probabilities = [float(td.get_attribute("data-value")) for td in
                             table.find_elements("css selector", '[data-field="probability"]')]
            assert list(zip(classes, probabilities)) == expected


def test_error_pages_and_the_app_keeps_serving(browser, url):
    browser.get(f"{url}/bases/nosuch")
    assert by_css(browser, "#error-status")[0].text == "404"
    assert "no base model named 'nosuch'" in by_css(browser, "#error-message")[0].text
    browser.get(f"{url}/bases/{SAMPLE_BASE}?page=-1")
    assert by_css(browser, "#error-status")[0].text == "400"
    browser.get(url + "/")
    assert by_css(browser, "#bases")


def test_screenshots_of_the_main_pages(browser, url, example, tmp_path):
    shots = example.take_screenshots(browser, url, tmp_path, SAMPLE_BASE, "odd-fused")
    assert [p.name for p in shots] == ["registry.png", "base.png", "task.png"]
    sizes = {}
    for path in shots:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        sizes[path.stem] = struct.unpack(">II", data[16:24])  # width, height
    assert all(width >= 1200 and height >= 500 for width, height in sizes.values())
    # The whole page, not the window: the base page (table and five charts) is the longest.
    assert sizes["base"][1] > 2 * sizes["registry"][1]
