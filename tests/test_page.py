"""The page at ``GET /`` in a real headless browser (Debian's chromium, driven through chromedriver by
selenium): type a sentence, select the mention and mark it, pick the probe, ask, and read the answer as
it streams in, title and description apart; the same answer as the API gives. CI installs chromium
(.ci/run) and sets KILM_REQUIRE_BROWSER=1, so there a missing browser fails instead of skipping.

``KILM_PAGE_SCREENSHOT=docs/serving-page.png`` also saves the screenshot where the docs show it; with
``KILM_PAGE_URL`` (a running service, e.g. ``kilm-ray demo --keep-serving``'s) and ``KILM_PAGE_SENTENCE`` /
``KILM_PAGE_MENTION`` the page is driven against that service and sentence instead (how the docs' picture of
the demo's model answering a held-out mention was taken)."""

import os
import shutil
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING = "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"

pytestmark = pytest.mark.slow

SENTENCE = os.environ.get("KILM_PAGE_SENTENCE", "Aristotle was a Greek philosopher and polymath.")
MENTION = os.environ.get("KILM_PAGE_MENTION", "philosopher")
MAX_TOKENS = int(os.environ.get("KILM_PAGE_MAX_TOKENS", "12"))


@pytest.fixture()
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        if os.environ.get("KILM_REQUIRE_BROWSER"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=900,860", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def page_service(request) -> str:
    """The service the page is driven against: KILM_PAGE_URL when given, else the session's test service."""
    return os.environ.get("KILM_PAGE_URL") or request.getfixturevalue("service")


def test_the_page_streams_a_probe_answer_in_a_real_browser(page_service, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    service = page_service

    browser.get(f"{service}/")
    assert "Probe the knowledge" in browser.find_element(By.TAG_NAME, "h1").text
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(SENTENCE)
    # Select the mention in the textarea as a user's drag would, then mark it.
    browser.execute_script("const b = arguments[0], i = b.value.indexOf(arguments[1]); b.focus(); "
                           "b.setSelectionRange(i, i + arguments[1].length);", box, MENTION)
    browser.find_element(By.ID, "mark").click()
    marked = SENTENCE.replace(MENTION, f"<ent>{MENTION}</ent>")
    assert box.get_property("value") == marked
    browser.find_element(By.CSS_SELECTOR, "input[name=probe][value=describe]").click()
    tokens = browser.find_element(By.ID, "max")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    browser.find_element(By.ID, "ask").click()
    answer = browser.find_element(By.ID, "answer")
    WebDriverWait(browser, 90).until(lambda d: answer.get_attribute("data-state") in ("done", "error"))
    status = browser.find_element(By.ID, "status").text
    assert answer.get_attribute("data-state") == "done", status
    title = browser.find_element(By.ID, "field-title").get_property("textContent")
    description = browser.find_element(By.ID, "field-description").get_property("textContent")
    api = httpx.post(f"{service}/v1/describe", json={"text": marked, "max_new_tokens": MAX_TOKENS}, timeout=120).json()
    assert (title, description) == (api["title"], api["description"])
    assert int(answer.get_attribute("data-deltas")) >= 2 or len(api["title"] + api["description"]) < 8, \
        "the answer came in one piece, not streamed"
    assert status.startswith(f"done ({api['finish_reason']})")
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("KILM_PAGE_SCREENSHOT"):
        Path(os.environ["KILM_PAGE_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, os.environ["KILM_PAGE_SCREENSHOT"])
    # A request the API refuses shows its message on the page.
    browser.find_element(By.CSS_SELECTOR, "input[name=probe][value=fill]").click()
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 60).until(lambda d: answer.get_attribute("data-state") == "error")
    assert "HTTP 422" in browser.find_element(By.ID, "status").text
    assert "must contain at least one <mask>" in browser.find_element(By.ID, "status").text
