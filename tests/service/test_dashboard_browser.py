"""A real headless Chromium against a real uvicorn server: log in, open the study list, open a
trained study, see its trials. Screenshots go to ``$HPO_TEST_ARTIFACTS`` (default
``test-artifacts/``, git-ignored).

Uses Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them) through
Selenium, pointed at ``/usr/bin/chromedriver`` so Selenium never downloads a browser. Without
them the test is skipped locally and fails under ``CI``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ADMIN, TOKENS, VIEWER, WORKER, spec
from live import LiveServer

from hpo_service.client import HPOClient
from hpo_service.config import Settings
from trainers.worker import Worker, WorkerOptions

pytestmark = [
    pytest.mark.slow,
    # Optuna's importance evaluator warns on three trials; under `filterwarnings = error` that
    # warning would turn the dashboard's importance panel into a 500 on the screenshot.
    pytest.mark.filterwarnings("ignore:Some regimes for parameter:UserWarning"),
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]
#: Generous: the first page load parses a 4 MB bundle on two shared cores.
WAIT_S = 90
# Headless, and quiet: without the networking switches Chromium keeps calling home, which on a
# closed network only slows it down.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1400",
)


def artifact_dir() -> Path:
    folder = Path(os.environ.get("HPO_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the dev extra)")
    if missing:
        reason = (
            f"browser test needs {', '.join(missing)}: "
            "apt-get install chromium chromium-driver; pip install -e '.[dev]'"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never look anything up
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def trained(tmp_path: Path) -> Iterator[tuple[LiveServer, dict[str, Any]]]:
    """A live server with auth and a study whose three trials the real worker completed."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'hpo.db'}",
        tokens=TOKENS,  # type: ignore[arg-type]
        heartbeat_interval_s=0.5,
        lease_timeout_s=30,
        run_reaper=False,
        db_connect_retries=0,
    )
    with LiveServer(settings) as server:
        body = spec("vae-browser", budget={"n_trials": 3, "max_concurrent": 1})
        created = httpx.post(f"{server.url}/v1/studies", json=body, headers=ADMIN, timeout=30)
        assert created.status_code == 201, created.text
        with httpx.Client(base_url=server.url, headers=WORKER, timeout=60) as http:
            options = WorkerOptions(worker_id="browser-gpu", wait_s=0, idle_exit_s=0)
            assert Worker(HPOClient(http), options).run() == 3
        info = httpx.get(f"{server.url}/v1/studies/vae-browser", headers=VIEWER, timeout=30)
        yield server, info.json()


def test_a_viewer_logs_in_and_sees_the_trials(
    browser: Any, trained: tuple[LiveServer, dict[str, Any]]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server, info = trained
    wait = WebDriverWait(browser, WAIT_S)

    def body_shows(*texts: str) -> None:
        wait.until(lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))

    # 1) The dashboard sends a browser without a token to the login form.
    browser.get(f"{server.url}/dashboard")
    wait.until(ec.url_contains("/login"))
    browser.find_element(By.ID, "token").send_keys("viewer-token")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    # 2) Logged in: the study list.
    wait.until(lambda d: d.current_url.split("?")[0] == f"{server.url}/dashboard")
    body_shows("vae-browser")

    # 3) Open the study: its page is where the API's `links.dashboard` points.
    study_page = f"/dashboard/studies/{info['study_id']}"
    browser.find_element(By.CSS_SELECTOR, f"a[href='{study_page}']").click()
    wait.until(ec.url_to_be(info["links"]["dashboard"]))
    body_shows("val_neg_elbo", "spec.budget", "Intermediate values")
    browser.save_screenshot(str(artifact_dir() / "dashboard-study.png"))

    # 4) The trial list: every trial, completed, with its worker and per-epoch metrics.
    browser.find_element(By.CSS_SELECTOR, "li[title='Trials (List)'] a").click()
    body_shows("3 Trials", "Trial 0", "Trial 1", "Trial 2", "Complete")
    body_shows("Intermediate Values", "worker_id browser-gpu", "metrics.val_kl", "metrics.beta")
    screenshot = artifact_dir() / "dashboard-trials.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The cookie it logged in with cannot write: it authenticates reads only, so a write with it
    # is unauthenticated (401, checked before the read-only gate's 405).
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/api/studies/{info['study_id']}', {{method: 'DELETE'}}).then(r => done(r.status));"
    )
    assert status == 401
    assert httpx.get(f"{server.url}/v1/studies", headers=VIEWER).json()[0]["name"] == "vae-browser"
