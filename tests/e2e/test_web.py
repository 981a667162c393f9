"""The web page in a real headless Chromium (Debian's, driven by Selenium) against the fleet:
choose a photo, pick a model, see the labels as bars; the random-weights banner when it applies;
a batch job on a folder, watched to the end, its CSV downloaded. The tests save screenshots to
run/screenshots/ (web-page.png, web-job.png)."""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from deploy.local.fleet import ROOT
from tests.e2e import shapes
from tests.e2e.conftest import E2EFleet

pytestmark = pytest.mark.e2e
SCREENSHOTS = ROOT / "run" / "screenshots"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "chromium/chromedriver missing: `make test` installs them (apt-get install chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1000,1100",
    ):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield browser
    finally:
        browser.quit()


def bars(browser: webdriver.Chrome) -> list[str]:
    return [element.text for element in browser.find_elements(By.CSS_SELECTOR, "#bars .label")]


def test_upload_a_photo_and_see_its_labels(
    fleet: E2EFleet, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    [image], _ = shapes.dataset(1, seed=99)
    photo = tmp_path / "shape.png"
    photo.write_bytes(image)
    expected = requests.post(
        f"{fleet.url}/v1/predict?model=shapes&top_k=5", files={"file": ("shape.png", image)}, timeout=60
    ).json()["predictions"]

    browser.get(f"{fleet.url}/")
    wait = WebDriverWait(browser, 30)
    models = wait.until(
        lambda b: (
            len(Select(b.find_element(By.ID, "model")).options) >= 6
            and Select(b.find_element(By.ID, "model"))
        )
    )
    assert "ensemble" in [option.get_attribute("value") for option in models.options]
    banner = browser.find_element(By.ID, "random-banner")
    assert banner.is_displayed()  # resnet50 is picked first, and its weights are random here

    models.select_by_value("shapes")  # trained in this run: real weights, no banner
    assert not banner.is_displayed()
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda b: b.find_element(By.ID, "go").is_enabled())
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: bars(b))
    assert bars(browser) == [p["label"] for p in expected]  # the top classes, best first, as bars
    track = browser.find_element(By.CSS_SELECTOR, "#bars .bar .track").size["width"]
    fill = browser.find_element(By.CSS_SELECTOR, "#bars .bar .fill").size["width"]
    assert fill == pytest.approx(max(0.01, expected[0]["score"]) * track, abs=2)  # drawn to scale
    assert "ms" in browser.find_element(By.ID, "timing").text
    assert "shapes" in browser.find_element(By.ID, "meta").text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOTS / "web-page.png"))

    models.select_by_value("resnet50")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: "resnet50" in b.find_element(By.ID, "meta").text)
    assert banner.is_displayed() and len(bars(browser)) == 5


def test_a_bad_url_shows_the_fleets_error(fleet: E2EFleet, browser: webdriver.Chrome) -> None:
    browser.get(f"{fleet.url}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) >= 6)
    browser.find_element(By.ID, "url").send_keys("file:///etc/passwd")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: b.find_element(By.ID, "error").text)
    assert "url" in browser.find_element(By.ID, "error").text.lower()


def test_a_folder_as_a_batch_job_runs_to_a_csv(
    fleet: E2EFleet, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    images, labels = shapes.dataset(6, seed=5)
    sent = []
    for number, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / shapes.CLASSES[label] / f"{number}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
        sent.append(path.relative_to(tmp_path).as_posix())  # e.g. photos/circle/0.png
    (folder / ".DS_Store").write_bytes(b"not an image")  # hidden: the page leaves it out

    browser.get(f"{fleet.url}/")
    wait = WebDriverWait(browser, 30)
    models = wait.until(
        lambda b: (
            len(Select(b.find_element(By.ID, "model")).options) >= 6
            and Select(b.find_element(By.ID, "model"))
        )
    )
    models.select_by_value("shapes")
    browser.find_element(By.ID, "job-folder").send_keys(str(folder))  # the folder picker, driven
    wait.until(lambda b: b.find_element(By.ID, "job-go").is_enabled())
    browser.find_element(By.ID, "job-go").click()
    status = browser.find_element(By.ID, "job-status")
    WebDriverWait(browser, 120).until(lambda b: status.text.startswith(("completed", "failed", "cancelled")))
    assert status.text.startswith("completed: 6 / 6 images"), status.text
    progress = browser.find_element(By.ID, "job-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "6"  # at the end
    assert not browser.find_element(By.ID, "job-cancel").is_displayed()

    link = browser.find_element(By.ID, "job-csv")
    assert link.is_displayed() and link.text == "Download CSV"
    href = link.get_attribute("href") or ""
    assert re.fullmatch(rf"{re.escape(fleet.url)}/v1/jobs/[0-9a-f]{{32}}/results\?format=csv", href), href
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOTS / "web-job.png"))

    answer = requests.get(href, timeout=30)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/csv")
    lines = answer.text.splitlines()
    assert len(lines) == 7  # the header and one row per image
    rows = list(csv.DictReader(lines))
    assert [row["name"] for row in rows] == sorted(sent)  # each file under its path in the folder
    assert {row["status"] for row in rows} == {"ok"} and {row["label_1"] for row in rows} <= set(
        shapes.CLASSES
    )
