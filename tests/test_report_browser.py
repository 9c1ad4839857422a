"""The HTML audit page opened in a real headless Chromium (Debian's package) through Selenium.

Selenium is pointed at the distribution's chromium and chromedriver explicitly and kept
offline, so Selenium Manager downloads nothing; `.ci/run` installs both packages.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import require_programs
from tests.test_report_audit import populated_store
from worker.audit.report import audit
from worker.audit.report_html import write_html
from worker.audit.report_text import format_text
from worker.scoring.model_metadata import OperatingPoint

require_programs("chromium chromium-driver", "/usr/bin/chromium", "/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def driver(tmp_path: Path):  # type: ignore[no-untyped-def]
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,2400",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_html_report_renders_in_chromium(tmp_path: Path, driver) -> None:  # type: ignore[no-untyped-def]
    store = populated_store(tmp_path / "a.db")
    page = tmp_path / "audit.html"
    write_html(audit(store, resamples=500), page)
    store.dispose()

    driver.get(page.as_uri())
    assert driver.title == "mammo-screen audit report"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    images = driver.find_elements("tag name", "img")
    assert len(images) == 2  # one plot row per model version
    for img in images:
        w, h = driver.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img
        )
        assert w > 500 and h > 200 and img.get_attribute("complete") == "true"
    body = driver.find_element("tag name", "body").text
    assert "research tool" in body.lower() and "How to read this" in body
    assert "<script>alert(1)</script>.png" in body  # shown as text, not run as markup
    assert "truth malignant" in body and "call malignant" in body

    # The window is tall enough for the header, the first figures table and its plots.
    assert driver.execute_script(
        "return arguments[0].getBoundingClientRect().bottom < window.innerHeight", images[0]
    )
    shot = tmp_path / "audit.png"
    assert driver.save_screenshot(str(shot))
    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.shape[0] > 500 and pixels.shape[1] > 500
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 50  # text, plot lines and heat-map shades, not a blank page
    keep = os.environ.get("MAMMO_KEEP_SCREENSHOT")
    if keep:  # for a person to look at
        shutil.copy(shot, keep)


def test_html_operating_points_match_the_text_report(tmp_path: Path, driver) -> None:  # type: ignore[no-untyped-def]
    store = populated_store(tmp_path / "a.db")
    points = {"probe-v1": {
        "sens90": OperatingPoint(0.30, "sensitivity >= 90%", 0.91, 0.40, 0.70),
        "recall10": OperatingPoint(0.72, "10% flagged", 0.25, 0.95, 0.10),
        "sens80": OperatingPoint(0.38, "sensitivity >= 80%"),  # no validation figures
    }}
    result = audit(store, resamples=200, operating_points=points)
    store.dispose()
    page = tmp_path / "audit.html"
    write_html(result, page)
    driver.get(page.as_uri())

    (table,) = driver.find_elements("css selector", "table.operating-points")
    assert table.is_displayed()
    shown = [[td.text for td in tr.find_elements("tag name", "td")]
             for tr in table.find_elements("tag name", "tr")]
    shown = [row for row in shown if row]  # the two header rows hold th only
    text = format_text(result.report).splitlines()
    start = next(i for i, line in enumerate(text)
                 if line.startswith("operating points of model probe-v1 "))
    # The text report's rows, read as cells: point, threshold, three figures in the period,
    # then "sens / spec / recall" on validation.
    expected = [line.replace(" / ", " ").split() for line in text[start + 2:start + 5]]
    assert shown == expected
    assert [row[0] for row in shown] == ["sens90", "sens80", "recall10"]  # by threshold
    assert shown[1][-3:] == ["n/a", "n/a", "n/a"]
