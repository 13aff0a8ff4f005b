"""The dashboard in a real browser: `agorasim dashboard` serves a tiny live market on 127.0.0.1,
headless Chromium (Debian's chromium and chromium-driver, driven by selenium through
/usr/bin/chromedriver: nothing is downloaded) opens it, waits for the plots, presses Mesa's Step
button, checks that the step counter, the plots and the followed user's slate change, and saves
a screenshot to the test's folder (and to docs/dashboard.png, which the README shows, when
AGORASIM_UPDATE_DOCS=1)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
STEPS = 4
# a controller re-ranker, so the fairness weight moves; everyone visits, so user 0 has a slate
WORLD = SMALL + ["platform.reranker=controller", "agents.users.activity=1.0", "run.rounds=50"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(what: str, condition, timeout: float = 60.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    argv = [sys.executable, "-m", "agorasim.cli", "dashboard", "--scenario", "popularity-loop", "--port", str(port)]
    for o in WORLD:
        argv += ["--set", o]
    # any asset missing from solara-assets would be fetched from this address, which refuses: the
    # page only loads if everything it needs came with the installed packages
    env = dict(os.environ, SOLARA_ASSETS_CDN="http://127.0.0.1:9/", AGORASIM_DASHBOARD_ACCESS_LOG="1")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"

    def up():
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait("the dashboard server", up, timeout=120)
        yield url, tmp_path / "server.log"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1750", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_steps_the_market_in_a_browser(server, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    url, server_log = server
    browser.get(url)

    def plots():
        images = [img for img in browser.find_elements(By.TAG_NAME, "img") if img.size["height"] > 100]
        return images if len(images) >= 5 else None

    def body():
        return browser.find_element(By.TAG_NAME, "body").text

    def snapshot(what: str):
        # a figure redrawn between finding its <img> and reading its pixels goes stale: find the
        # figures again and retry until one pass reads every figure
        def once():
            try:
                return [img.screenshot_as_png for img in plots() or ()] or None
            except StaleElementReferenceException:
                return None
        return _wait(what, once)

    before = snapshot("the plots")
    assert "Step: 0" in body() and "User 0 has not visited yet" in body()
    assert "popularity-loop" in browser.title or "popularity-loop" in body()

    (step,) = [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip().lower() == "step"]
    for n in range(1, STEPS + 1):
        step.click()
        _wait(f"step {n}", lambda n=n: f"Step: {n}" in body())
    _wait("the followed user's slate", lambda: f"User 0, round {STEPS - 1}" in body())
    time.sleep(1.0)  # the last redraw of every figure reaches the page

    after = snapshot("the plots after the steps")
    changed = sum(a != b for a, b in zip(after, before))
    assert changed >= 5, f"only {changed} of {len(before)} figures changed after {STEPS} steps"
    assert "clicked, rated" in body() or "not interested" in body() or "preferred other" in body()

    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if os.environ.get("AGORASIM_UPDATE_DOCS") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "dashboard.png")
    log = server_log.read_text()
    assert "Could not load URL" not in log, log  # nothing was fetched from a CDN
    assert "Traceback" not in log, log
