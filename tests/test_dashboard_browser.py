"""`autocnnp dashboard` in a real browser (Debian's headless Chromium driven by selenium) while a 2-rank run
trains with the mlflow tracker: the run shows as running, its Dice charts and both ranks' system metrics
are there and grow, and a screenshot is saved (AUTOCNNP_SCREENSHOT=PATH keeps a copy, e.g. for the README).
Without Chromium the test is skipped, unless AUTOCNNP_REQUIRE_BROWSER=1 (CI) makes that a failure."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from jobfiles import TINY_UNET, synthetic_data, write_job


def _browser():
    why = None
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        why = "Debian's chromium and chromium-driver are not installed (bash cluster/install-deps.sh test)"
    try:
        import mlflow  # noqa: F401
        from selenium import webdriver  # noqa: F401
    except ImportError as exc:
        why = why or f"{exc.name} is not installed (make venv)"
    if why and os.environ.get("AUTOCNNP_REQUIRE_BROWSER") == "1":
        pytest.fail(why + " (AUTOCNNP_REQUIRE_BROWSER=1: the browser test must run)")
    if why:
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def page_text(driver, url: str, needles: tuple[str, ...], timeout: float = 60) -> str:
    """Open ``url`` and wait until the page shows every needle; returns its text."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    deadline = time.monotonic() + timeout
    while True:
        text = driver.find_element(By.TAG_NAME, "body").text
        if all(n in text for n in needles) or time.monotonic() > deadline:
            return text
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.ranks
@pytest.mark.browser
def test_watch_a_two_rank_run_in_the_browser(tmp_path):
    _browser()
    from mlflow.tracking import MlflowClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    dash = subprocess.Popen([sys.executable, "-m", "autocnnp", "dashboard", "--store", tmp_path / "store", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    run = driver = None
    try:
        assert dash.stdout.readline().startswith(f"autocnnp dashboard: {url}")
        monitoring = (f'<monitoring><property name="tracker">mlflow</property><property name="tracking_uri">{url}'
                      '</property><property name="progress">false</property><property name="sample_interval_s">0.5'
                      '</property><property name="system_interval_s">1</property></monitoring>')
        job = write_job(tmp_path / "job.xml", output="runs/live", arch=TINY_UNET, data=synthetic_data(64, 8, size=32),
                        hyper=dict(minibatch_size=4, end_epoch=1000, lr=0.05, optimiser="sgd"), extra=monitoring)
        run = subprocess.Popen([sys.executable, "-m", "autocnnp", "run", str(job)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        client = MlflowClient(url)
        deadline = time.monotonic() + 120
        while True:  # training, with a few epochs and both ranks' samples sent
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else "timeout"
            exp = client.get_experiment_by_name("job")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "dice_fg")) >= 2 and \
                    client.get_metric_history(runs[0].info.run_id, "system/rank1/cpu_percent"):
                break
            time.sleep(1)
        info = runs[0].info
        page = f"{url}/#/experiments/{info.experiment_id}/runs/{info.run_id}"
        driver = chrome()
        text = page_text(driver, page, ("live", "Running", "dice_fg"))
        assert "Running" in text and "dice_fg" in text  # the run page, while it trains
        page_text(driver, f"{page}/model-metrics", ("left_atrium", "Step"))
        search = driver.find_element("css selector", "input[placeholder*='Search metric charts']")
        search.send_keys("dice")  # the charts of every Dice metric: per class, and the mean foreground one
        time.sleep(3)
        text = driver.find_element("tag name", "body").text
        assert "dice_fg" in text and "left_atrium" in text and driver.find_elements("css selector", "svg")
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if os.environ.get("AUTOCNNP_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["AUTOCNNP_SCREENSHOT"])
        text = page_text(driver, f"{page}/system-metrics", ("system/rank0", "system/rank1", "cpu_percent"))
        assert "system/rank0" in text and "system/rank1" in text and "rss_mb" in text
        before = len(client.get_metric_history(info.run_id, "dice_fg"))
        time.sleep(4)
        assert len(client.get_metric_history(info.run_id, "dice_fg")) > before  # live: it goes on growing
        assert client.get_run(info.run_id).info.status == "RUNNING"
        stop(run)  # Ctrl-C: the run ends as killed, and says so to the store before its ranks go
        assert run.returncode == 130 and client.get_run(info.run_id).info.status == "KILLED"
    finally:
        if driver is not None:
            driver.quit()
        for proc in (run, dash):
            if proc is not None:
                stop(proc)
    assert dash.returncode == 0
    print(f"dashboard test: {before} epochs shown while training; screenshot {shot}")
