"""JupyterLab as a researcher meets it: headless Chromium (Debian's chromium + chromium-driver) opens
train.ipynb from the file browser, sets a CI-sized parameter, runs all cells and sees the live progress widget
and the inline figure with no error output; opening and saving changes nothing in the committed notebook.
Skipped, with the reason, where no browser is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest
from test_notebooks import BROWSER_RUN, CI_RUNS, _wait_for
from train_helpers import ROOT

# ------------------------------------------------------------------ JupyterLab in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = ROOT / "runs" / "jupyterlab-train.png"


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:  # not listening yet
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path, monkeypatch):
    """JupyterLab as the README starts it (pre-save hook on), serving a checkout whose notebooks/ is a copy."""
    checkout = tmp_path / "wmtp"
    (checkout / "notebooks").mkdir(parents=True)
    shutil.copy2(ROOT / "notebooks" / "train.ipynb", checkout / "notebooks" / "train.ipynb")
    for folder in ("wmtp_lib", "params"):
        os.symlink(ROOT / folder, checkout / folder)
    port, token = _free_port(), "wmtp-browser-test"
    env = {**os.environ, "WMTP_CI": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={checkout}",
         "--ContentsManager.pre_save_hook=wmtp_lib.notebook_files.pre_save_hook"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: server.poll() is not None or _answers(f"http://127.0.0.1:{port}/api/status?token={token}"), 90)
        assert server.poll() is None, "JupyterLab exited:\n" + (tmp_path / "jupyterlab.log").read_text()[-3000:]
        yield f"http://127.0.0.1:{port}/lab?token={token}", checkout
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server shuts its kernels down
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no browser: install Debian's chromium and chromium-driver (apt-get install -y chromium "
                           "chromium-driver, as .ci/run does) to drive JupyterLab")
def test_train_notebook_in_jupyterlab(jupyterlab, tmp_path):
    """Open train.ipynb from the file browser, set a CI-sized parameter, Run All: a live progress widget and
    the inline figure, no error output; saving writes no outputs and changes no metadata."""
    from selenium import webdriver
    from selenium.common.exceptions import (
        ElementNotInteractableException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, checkout = jupyterlab
    notebook = checkout / "notebooks" / "train.ipynb"
    committed = notebook.read_bytes()
    run_dir = CI_RUNS / BROWSER_RUN
    if run_dir.exists():
        shutil.rmtree(run_dir)  # CI scratch: a stale run would resume instead of training
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    wait = WebDriverWait(driver, 60)

    def open_in_file_browser(name: str) -> None:
        item = wait.until(ec.element_to_be_clickable(
            (By.XPATH, f"//li[contains(@class, 'jp-DirListing-item')][.//span[text()='{name}']]")))
        ActionChains(driver).double_click(item).perform()

    def save() -> None:
        ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()

    def saved_since(mtime_ns: int) -> bool:
        """The server wrote the notebook again, completely (it writes in place: an empty file first)."""
        if notebook.stat().st_mtime_ns == mtime_ns:
            return False
        try:
            json.loads(notebook.read_text())
        except json.JSONDecodeError:
            return False
        return True

    def click(css: str, index: int = 0):
        """Click the element once JupyterLab has stopped re-rendering it (a kernel start re-renders cells)."""
        for _ in range(20):
            try:
                element = driver.find_elements(By.CSS_SELECTOR, css)[index]
                element.click()
                return element
            except (StaleElementReferenceException, ElementNotInteractableException, IndexError):
                time.sleep(0.25)
        raise AssertionError(f"{css} never became clickable")

    try:
        driver.get(url)
        open_in_file_browser("notebooks")
        open_in_file_browser("train.ipynb")
        wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")))
        # opening and saving with the kernel started changes nothing in the committed file
        before = notebook.stat().st_mtime_ns
        click(".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt")
        save()
        _wait_for(lambda: saved_since(before), 20)
        assert notebook.read_bytes() == committed, "JupyterLab rewrote the notebook on open + save"

        # the parameters cell: a CI-sized run of its own (WMTP_CI=1 in the server's environment sizes the rest)
        editor = click(".jp-NotebookPanel .jp-CodeCell .cm-content")
        ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.END).key_up(Keys.CONTROL).perform()
        ActionChains(driver).send_keys(Keys.ENTER, 'overrides = {"train.steps": 10').perform()
        source = editor.text
        assert re.search(r'overrides = \{"train\.steps": 10\}?', source), source
        if not source.rstrip().endswith("}"):
            ActionChains(driver).send_keys("}").perform()
        driver.find_element(By.XPATH, "//div[contains(@class, 'lm-MenuBar-itemLabel')][text()='Run']").click()
        driver.find_element(By.XPATH, "//div[contains(@class, 'lm-Menu-itemLabel')][text()='Run All Cells']").click()

        progress = WebDriverWait(driver, 120).until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, ".jp-OutputArea-output .widget-hprogress, .jp-OutputArea-output .widget-progress")))
        assert progress.is_displayed()
        WebDriverWait(driver, 150).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-RenderedImage img") or
                                         d.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.stderr']"))
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR,
                                                       "[data-mime-type='application/vnd.jupyter.stderr']")]
        assert not errors, f"error output in the notebook (screenshot {SCREENSHOT}):\n" + "\n".join(errors)[-3000:]
        image = driver.find_element(By.CSS_SELECTOR, ".jp-RenderedImage img")
        assert image.size["width"] > 300, "the inline figure is rendered"
        text = driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook").text
        assert f"named {BROWSER_RUN}" in text and "step 10/10 loss" in text, text[-2000:]
        assert "Error displaying widget" not in text and "Traceback" not in text
        assert (run_dir / "summary.json").is_file()

        # saving after the run writes the edit, never the outputs
        before = notebook.stat().st_mtime_ns
        save()
        _wait_for(lambda: saved_since(before), 20)
        saved = nbformat.read(notebook, as_version=4)
        assert not any(c.get("outputs") or c.get("execution_count") for c in saved.cells if c.cell_type == "code")
        assert '"train.steps": 10' in saved.cells[1].source and saved.metadata == nbformat.reads(
            committed.decode(), as_version=4).metadata
    finally:
        driver.quit()
