"""The console in a real headless browser (Debian's chromium + chromedriver, Selenium).

The demo's plant and every live service run on the test broker; the browser loads the
page, watches values change when the simulated load changes, acknowledges an alarm,
switches a bank step by hand (the simulator's coil moves), and the page logs no error.
Set ``PFM_SCREENSHOTS=docs`` to write the overview and bank screenshots there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from tests.console_stack import PASSWORD, USER, Stack, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver; .ci/run installs them)",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402


@pytest.fixture(scope="module")
def stack(mqtt_url: str, db_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    site_name = f"b{uuid.uuid4().hex[:10]}"
    folder = tmp_path_factory.mktemp("console-browser")
    settings = Settings(
        mqtt_url=mqtt_url,
        db_dsn=db_dsn,
        data_dir=folder / "data",
        metrics_port=0,
        mqtt_client_id=f"pfm-test-{site_name}",
        log_format="text",
    )
    with Stack(settings, site_name, folder) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="pfm-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the machine's chromedriver, never one downloaded by Selenium Manager
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _text(driver: WebDriver, css: str) -> str:
    try:
        return str(driver.find_element(By.CSS_SELECTOR, css).text)
    except (StaleElementReferenceException, NoSuchElementException):
        return ""


def _attr(driver: WebDriver, css: str, name: str) -> str | None:
    try:
        return driver.find_element(By.CSS_SELECTOR, css).get_attribute(name)  # type: ignore[no-any-return]
    except (StaleElementReferenceException, NoSuchElementException):
        return None


def _value(driver: WebDriver, meter: str, q: str) -> float | None:
    text = _text(driver, f'.meter[data-meter="{meter}"] [data-q="{q}"]').lstrip("±")
    try:
        return float(text)
    except ValueError:
        return None


def _errors(driver: WebDriver) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _screenshot(driver: WebDriver, name: str, tmp: Path) -> Path:
    out = tmp / name
    driver.save_screenshot(str(out))
    folder = os.environ.get("PFM_SCREENSHOTS")
    if folder:
        shutil.copy(out, Path(folder) / name)
    assert out.stat().st_size > 5000
    return out


def _click(driver: WebDriver, css: str) -> None:
    """Click ``css``; the page re-renders live, so an element may go stale: look again."""

    def attempt() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
        except (StaleElementReferenceException, NoSuchElementException):
            return False
        return True

    wait_until(attempt, 10, f"a click on {css}", every=0.1)


def _login(driver: WebDriver) -> None:
    if _text(driver, "#whoami").startswith("operator:"):
        return
    driver.find_element(By.ID, "login-user").send_keys(USER)
    driver.find_element(By.ID, "login-password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login-submit").click()
    wait_until(lambda: _text(driver, "#whoami") == f"operator: {USER}", 15, "the login")


def test_the_overview_shows_every_meter_live_and_values_follow_the_load(
    stack: Stack, browser: WebDriver, tmp_path: Path
) -> None:
    browser.get(stack.url)
    shown = wait_until(
        lambda: browser.execute_script(
            "return [...document.querySelectorAll('.meter[data-meter]')]"
            ".map(e => e.getAttribute('data-meter'))"
        ),
        15,
        "meter cards",
    )
    assert sorted(shown) == sorted(m.name for m in stack.site.meters)
    for m in stack.site.meters:
        wait_until(
            lambda m=m: _attr(browser, f'.meter[data-meter="{m.name}"]', "data-status") == "live",
            20,
            f"{m.name} live",
        )
    # feeders hang below the incomer in the single-line view
    feeders = browser.execute_script(
        "return [...document.querySelectorAll('#single-line > li > ul .meter')]"
        ".map(e => e.getAttribute('data-meter'))"
    )
    assert set(feeders) == {"compressor", "servers"}
    assert "kW" in _text(browser, '.meter[data-meter="main"]')
    before = wait_until(lambda: _value(browser, "main", "kw"), 10, "the incomer's kW")
    stack.call(lambda: stack.plant.set_load("pump", kw=5.0))  # 45 kW -> 5 kW
    try:
        wait_until(
            lambda: (v := _value(browser, "main", "kw")) is not None and v < before - 25,
            15,
            f"the incomer's kW to drop from {before}",
        )
    finally:
        stack.call(lambda: stack.plant.set_load("pump", kw=45.0))
    _screenshot(browser, "console-overview.png", tmp_path)
    assert _errors(browser) == []


def test_an_alarm_appears_and_is_acknowledged(stack: Stack, browser: WebDriver) -> None:
    browser.get(stack.url + "#/alarms")
    _login(browser)
    row_css = 'tr.alarm[data-alarm="compressor|low_pf|"]'
    wait_until(lambda: "pf=" in _text(browser, row_css), 30, "the low_pf alarm, with evidence")
    _click(browser, f"{row_css} button.ack")
    wait_until(
        lambda: f"acknowledged by {USER}" in _text(browser, f"{row_css} .ack-state"),
        15,
        "the acknowledgement",
    )
    recent = _text(browser, "#recent")
    assert "alarm_ack" in recent
    assert _errors(browser) == []


def test_the_history_page_draws_from_the_archive_and_links_the_report(
    stack: Stack, browser: WebDriver
) -> None:
    browser.get(stack.url + "#/history")
    text = wait_until(lambda: _text(browser, "#charts"), 15, "the history charts")
    assert "point(s) from pfm_metrics_1m" in text
    href = wait_until(lambda: _attr(browser, "#report-link", "href"), 10, "the report link")
    assert "/api/report?" in href and "format=md" in href
    assert _errors(browser) == []


def test_a_step_is_switched_by_hand_and_the_simulated_coil_follows(
    stack: Stack, browser: WebDriver, tmp_path: Path
) -> None:
    assert stack.plant.bank is not None
    bank = stack.plant.bank
    browser.get(stack.url + "#/bank/main")
    _login(browser)
    wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, 'tr[data-in="true"]'), 40, "a step in"
    )
    _click(browser, "#mode-manual")
    wait_until(lambda: _text(browser, "#bank-mode") == "manual", 15, "manual mode")
    step = int(
        wait_until(
            lambda: _attr(browser, 'tr[data-in="true"]', "data-step"), 10, "a step that is in"
        )
    )
    coil = stack.site.banks[0].step_coils[step - 1]
    assert stack.call(lambda: bank.state[coil]) is True
    _click(browser, f'tr[data-step="{step}"] button.step-out')
    wait_until(lambda: stack.call(lambda: bank.state[coil]) is False, 15, "the coil to open")
    wait_until(
        lambda: _attr(browser, f'tr[data-step="{step}"]', "data-in") == "false",
        15,
        "the page to show the step out",
    )
    wait_until(lambda: "discharging" in _text(browser, "#steps"), 10, "the discharge lockout")
    _screenshot(browser, "console-bank.png", tmp_path)
    _click(browser, "#mode-auto")
    wait_until(lambda: _text(browser, "#bank-mode") == "auto", 15, "automatic mode")
    assert _errors(browser) == []


_FETCH = (
    "const done = arguments[arguments.length - 1];"
    "fetch('/api/banks/main/mode', {method: 'POST', headers: Object.assign("
    "{'Content-Type': 'application/json'}, arguments[0]), body: JSON.stringify({mode: "
    "'manual'})}).then(r => done(r.status));"
)


def test_a_logged_out_page_cannot_act_nor_a_forged_csrf_token(
    stack: Stack, browser: WebDriver
) -> None:
    browser.get(stack.url + "#/bank/main")
    _login(browser)
    # logged in (the session cookie goes along) but without the page's CSRF token
    assert browser.execute_async_script(_FETCH, {"X-CSRF-Token": "forged"}) == 403
    assert browser.execute_async_script(_FETCH, {}) == 403
    if _attr(browser, "#logout", "hidden") is None:
        _click(browser, "#logout")
    wait_until(
        lambda: _text(browser, "#flash") == "Logged out." or _text(browser, "#whoami") == "",
        10,
        "logout",
    )
    browser.get(stack.url + "#/bank/main")
    wait_until(lambda: browser.find_elements(By.ID, "mode-manual"), 15, "the bank page")
    wait_until(lambda: _attr(browser, "#mode-manual", "disabled") is not None, 10, "no button")
    # a script on the page that tries anyway is refused by the server
    assert browser.execute_async_script(_FETCH, {}) == 401
    assert _text(browser, "#bank-mode") == "auto"
