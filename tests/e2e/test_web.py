"""The web page in a real headless Chromium (Debian's, driven by Selenium) against the fleet:
choose a photo, pick a model, see the labels as bars, the hedged answer, each label's parents and
the heatmap of an explanation; the random-weights banner when it applies;
a batch job on a folder, watched to the end, its CSV downloaded; custom classes trained on a folder,
their evaluation shown, the new model offered in the picker. The tests save screenshots to
run/screenshots/ (web-page.png, web-explain.png, web-job.png, web-training.png)."""

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
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from deploy.local.fleet import ROOT
from tests import colours
from tests.e2e import shapes
from tests.e2e.running import E2EFleet

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


def test_the_hedged_answer_the_parents_and_the_heatmap_are_shown(
    fleet: E2EFleet, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    cat = ROOT / "tests" / "fixtures" / "chelsea.jpg"
    expected = requests.post(
        f"{fleet.url}/v1/predict?model=resnet50&top_k=5&parents=true&confidence=0.8",
        files={"file": ("chelsea.jpg", cat.read_bytes())},
        timeout=60,
    ).json()
    browser.get(f"{fleet.url}/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) >= 6)
    Select(browser.find_element(By.ID, "model")).select_by_value("resnet50")
    browser.find_element(By.ID, "file").send_keys(str(cat))
    wait.until(lambda b: b.find_element(By.ID, "go").is_enabled())
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: bars(b))
    hedged = browser.find_element(By.ID, "hedged").text
    assert hedged.startswith("At least 80% sure: ") and expected["hedged"]["name"] in hedged
    chains = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "#bars .parents")]
    assert chains[0] == " › ".join(parent["name"] for parent in expected["predictions"][0]["parents"])
    assert chains[0].endswith("entity") and len(chains) == 5

    browser.find_element(By.ID, "explain-go").click()
    wait.until(lambda b: b.find_element(By.ID, "explanation").is_displayed())
    wait.until(
        lambda b: b.execute_script("return document.getElementById('explanation-image').naturalWidth") == 448
    )
    caption = browser.find_element(By.ID, "explanation-caption").text
    assert "7 x 7 grid, 50 forward passes" in caption and expected["predictions"][0]["label"] in caption
    assert "Random weights" in browser.find_element(By.ID, "explanation-note").text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("document.getElementById('hedged').scrollIntoView()")
    assert browser.save_screenshot(str(SCREENSHOTS / "web-explain.png"))

    Select(browser.find_element(By.ID, "model")).select_by_value("shapes")  # flat classes of its own
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: "flat classes" in b.find_element(By.ID, "hedged").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#bars .parents")


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
    browser.find_element(By.ID, "api-key").send_keys(fleet.admin_key)  # jobs and training need a key
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

    assert requests.get(href, timeout=30).status_code == 401  # the results are the job owner's
    answer = requests.get(href, headers=fleet.admin, timeout=30)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/csv")
    lines = answer.text.splitlines()
    assert len(lines) == 7  # the header and one row per image
    rows = list(csv.DictReader(lines))
    assert [row["name"] for row in rows] == sorted(sent)  # each file under its path in the folder
    assert {row["status"] for row in rows} == {"ok"} and {row["label_1"] for row in rows} <= set(
        shapes.CLASSES
    )


def texts(browser: webdriver.Chrome, selector: str) -> list[str]:
    return [element.text for element in browser.find_elements(By.CSS_SELECTOR, selector)]


def test_a_folder_of_classes_trains_a_model_the_picker_then_offers(
    fleet: E2EFleet, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    for number, (label, image) in enumerate(colours.images(6, seed=21, classes=("red", "blue"))):
        path = folder / label / f"{number}.jpg"  # e.g. photos/red/0.jpg: one subfolder per class
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
    (folder / ".DS_Store").write_bytes(b"not an image")  # hidden: the page leaves it out
    name = "web-colours"

    browser.get(f"{fleet.url}/")
    browser.find_element(By.ID, "api-key").send_keys(fleet.admin_key)  # jobs and training need a key
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) >= 6)
    try:
        browser.find_element(By.ID, "train-folder").send_keys(str(folder))  # the folder picker, driven
        browser.find_element(By.ID, "train-name").send_keys(name)
        Select(browser.find_element(By.ID, "train-base")).select_by_value("resnet50")
        browser.find_element(By.ID, "train-epochs").send_keys("10")
        wait.until(lambda b: b.find_element(By.ID, "train-go").is_enabled())
        browser.find_element(By.ID, "train-go").click()
        status = browser.find_element(By.ID, "train-status")
        WebDriverWait(browser, 240).until(
            lambda b: status.text.startswith(("completed", "failed", "cancelled"))
        )
        assert status.text.startswith(f"completed: {name} version "), (
            status.text,
            browser.find_element(By.ID, "train-error").text,
        )
        assert browser.find_element(By.ID, "train-error").text == ""
        progress = browser.find_element(By.ID, "train-progress")
        assert progress.get_attribute("value") == progress.get_attribute("max") == "100"
        assert not browser.find_element(By.ID, "train-cancel").is_displayed()
        assert browser.find_element(By.ID, "train-classes").text.startswith(
            "2 classes: blue (6 photos), red (6 photos)"
        )
        assert browser.find_element(By.ID, "train-epoch").text.startswith("epoch 10 / 10: loss ")
        assert not browser.find_element(By.ID, "train-skipped").is_displayed()  # every photo was read

        wait.until(lambda b: b.find_element(By.ID, "train-confusion").is_displayed())
        assert texts(browser, "#train-confusion thead th") == ["blue", "red"]  # the predicted classes
        assert texts(browser, "#train-confusion tbody th") == ["blue", "red"]  # the true classes
        rows = browser.find_elements(By.CSS_SELECTOR, "#train-confusion tbody tr")
        matrix = [[int(c.text) for c in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix), matrix
        held_out = sum(map(sum, matrix))
        assert held_out == 2, matrix  # one photo of each class held out (validation_split 0.2)
        accuracy = browser.find_element(By.ID, "train-accuracy").text
        assert re.fullmatch(rf"accuracy \d+\.\d% on {held_out} held-out photos", accuracy), accuracy
        assert texts(browser, "#train-per-class tbody th") == ["blue", "red"]
        assert texts(browser, "#train-per-class tbody td:last-child") == ["1", "1"]  # photos held out

        # The new model joins the picker, selected, once the gateway lists it.
        models = WebDriverWait(browser, 60, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda b: (
                name in [o.get_attribute("value") for o in Select(b.find_element(By.ID, "model")).options]
                and Select(b.find_element(By.ID, "model"))
            )
        )
        assert models.first_selected_option.get_attribute("value") == name
        assert "custom" in models.first_selected_option.text
        browser.execute_script("arguments[0].scrollIntoView()", browser.find_element(By.ID, "training"))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOTS / "web-training.png"))

        # ... and classifies with its own two classes.
        [(_, image)] = colours.images(1, seed=22, classes=("red",))
        photo = tmp_path / "fresh.jpg"
        photo.write_bytes(image)
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda b: b.find_element(By.ID, "go").is_enabled())
        browser.find_element(By.ID, "go").click()
        wait.until(lambda b: name in b.find_element(By.ID, "meta").text)
        assert sorted(bars(browser)) == ["blue", "red"]
    finally:
        requests.delete(f"{fleet.url}/v1/models/{name}", headers=fleet.admin, timeout=30)
