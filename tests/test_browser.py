"""The notebook in a real browser: JupyterLab 4 driven by headless Chromium, as a person would.

On a smoke copy of EVA8_session6.ipynb (``SMOKE`` and ``INTERACTIVE`` on, a tiny synthetic
image folder, no download) in a temporary folder, the test checks that

1. Run > Run All Cells gives every code cell an execution count, with no error output, and
   the training progress bars render as widgets while it runs;
2. the augmentation slider renders, and moving it (arrow key on its handle) changes the
   figure under it;
3. after File > Save Notebook and Kernel > Shut Down Kernel, the saved notebook reopened in a
   fresh tab with no kernel shows no "Error displaying widget" in the training cell's output
   and a static figure in the slider's cell (nothing is executed again).

Run it with ``.venv/bin/python -m pytest -s -m browser tests/test_browser.py`` (about a
minute and a half on 2 CPU cores; ``-m 'not browser'`` or ``-m 'not slow'`` leaves it out).
It needs ``chromium`` and ``chromedriver`` on PATH (Debian: ``apt-get install chromium
chromium-driver``) and ``jupyterlab``, ``jupyterlab_widgets`` and ``selenium`` in the venv
(``.ci/run`` installs them); without them it is skipped, saying what is missing.
JupyterLab listens on 127.0.0.1 only, with a token; Chromium resolves no host but 127.0.0.1.
Screenshots of each stage go to ``$BROWSER_SCREENSHOTS`` if set, else to pytest's tmp_path;
their paths are printed (``-s`` shows them).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "EVA8_session6.ipynb"
NB_NAME = "smoke.ipynb"

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs chromium and chromedriver on PATH (apt-get install chromium "
                "chromium-driver)", allow_module_level=True)
for _module in ("jupyterlab", "jupyterlab_widgets", "selenium"):
    pytest.importorskip(_module, reason=f"needs {_module} (pip install jupyterlab "
                        "jupyterlab_widgets selenium)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser]

RUN_ALL_LIMIT = 300  # seconds for Run All of the smoke copy (about a minute here)
CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-first-run",
    "--no-default-browser-check", "--metrics-recording-only", "--window-size=1400,1000",
    # The network is closed: no host resolves but the server's (the notebook's Colab badge,
    # for one, points to the internet).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
# Lab's own settings: no news or update checks (they would reach the internet).
LAB_SETTINGS = {"@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                {"checkForUpdates": False, "fetchNews": "false"}}

OUTPUT = ".jp-OutputArea-output"
STDERR = OUTPUT + '[data-mime-type="application/vnd.jupyter.stderr"]'
PROGRESS = ", ".join(f"{OUTPUT} {s}" for s in (".widget-hprogress", ".widget-progress",
                                                ".progress", "progress"))
WIDGET_ERROR = "Error displaying widget"


# --------------------------------------------------------------------------- the smoke copy
def write_tiny_cifar(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    """Random 32x32 RGB PNGs in CIFAR-10's image-folder layout (train/<class>, test/<class>)."""
    from PIL import Image

    from helpers import CIFAR10_CLASSES
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def write_smoke_notebook(source: Path, target: Path, data_dir: Path) -> None:
    """The notebook with its parameters set for a smoke run, any injected ones removed."""
    import nbformat
    nb = nbformat.read(source, as_version=4)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for cell in nb.cells:
        if cell.cell_type == "code":  # cleared, so that each prompt shows whether it ran
            cell.execution_count, cell.outputs = None, []
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "expected one cell tagged 'parameters'"
    values = dict(SMOKE=True, INTERACTIVE=True, DATA_DIR=str(data_dir), DOWNLOAD=False)
    source_code = params[0].source
    for name, value in values.items():
        source_code, n = re.subn(rf"^{name} *=.*$", f"{name} = {value!r}", source_code,
                                 flags=re.M)
        assert n == 1, f"the parameters cell should set {name} once"
    params[0].source = source_code
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nbformat.write(nb, target)


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A running JupyterLab server: its URL, token and REST API."""

    def __init__(self, proc: subprocess.Popen, port: int, token: str, log: Path):
        self.proc, self.port, self.token, self.log = proc, port, token, log
        self.url = f"http://127.0.0.1:{port}"

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def page(self, notebook: str) -> str:
        return f"{self.url}/lab/tree/{notebook}?token={self.token}"

    def kernels(self) -> list[dict]:
        return self.api("kernels")

    def last_modified(self, notebook: str) -> str:
        return self.api(f"contents/{notebook}?content=0")["last_modified"]

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def wait_until_answering(lab: Lab, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if lab.proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {lab.proc.returncode}:\n{lab.log_tail()}")
        try:
            lab.api("status")
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {limit} s:\n{lab.log_tail()}")


def stop_server(lab: Lab) -> None:
    """Shut the kernels and the server down; kill whatever is left of them."""
    import psutil
    try:
        children = psutil.Process(lab.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        for kernel in lab.kernels():
            lab.api(f"kernels/{kernel['id']}", method="DELETE")
        lab.api("shutdown", method="POST")
    except (urllib.error.URLError, OSError):
        pass
    try:
        lab.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        lab.proc.terminate()
        try:
            lab.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            lab.proc.kill()
            lab.proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The server's root: helpers.py, the smoke notebook and its tiny data."""
    work = tmp_path_factory.mktemp("lab-root")
    shutil.copy(ROOT / "helpers.py", work / "helpers.py")
    write_tiny_cifar(work / "data")
    write_smoke_notebook(NOTEBOOK, work / NB_NAME, work / "data")
    return work


@pytest.fixture(scope="module")
def lab(workdir, tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token; its config, data, runtime, settings and
    workspaces in a temporary folder (the venv's share/jupyter still provides the widgets'
    labextension and the python3 kernel)."""
    home = tmp_path_factory.mktemp("jupyter-home")
    for name, settings in LAB_SETTINGS.items():
        (home / "settings" / name).parent.mkdir(parents=True, exist_ok=True)
        (home / "settings" / name).write_text(json.dumps(settings))
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "IPYTHONDIR": str(home / "ipython"), "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    port, token, log = free_port(), secrets.token_hex(16), home / "server.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workdir}",
               f"--LabApp.user_settings_dir={home / 'settings'}",
               f"--LabApp.workspaces_dir={home / 'workspaces'}",
               # nothing that would reach the internet: no news, update or extension look-ups
               "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--allow-root", "--ServerApp.log_level=WARN"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Lab(proc, port, token, log)
    try:
        wait_until_answering(server)
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium (a fresh profile, no network) through chromedriver."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS + (f"--user-data-dir={profile}",):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path):
    """save(name): a PNG of the page in $BROWSER_SCREENSHOTS (else tmp_path); prints its path."""
    folder = Path(os.environ.get("BROWSER_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)

    def save(driver, name: str) -> Path:
        path = folder / f"{name}.png"
        driver.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path
    return save


# --------------------------------------------------------------------------- the page
def wait(driver, seconds: float = 30):
    return WebDriverWait(driver, seconds, poll_frequency=0.25)


def text_of(element) -> str:
    return (element.get_attribute("textContent") or "").strip()


def by_text(driver, selector: str, text: str):
    """The visible element matching ``selector`` whose text is ``text`` (or False)."""
    for element in driver.find_elements(By.CSS_SELECTOR, selector):
        if text_of(element) == text and element.is_displayed():
            return element
    return False


def click_menu(driver, menu: str, item: str) -> None:
    """Click ``menu`` in the menu bar, then its item ``item`` (both by their visible text)."""
    wait(driver).until(lambda d: by_text(d, ".lm-MenuBar-item", menu)).click()
    label = wait(driver).until(lambda d: by_text(d, ".lm-Menu .lm-Menu-itemLabel", item))
    label.find_element(By.XPATH, "./ancestor::li[contains(@class, 'lm-Menu-item')]").click()


def accept_dialog_if_any(driver, choice: str | None = None) -> bool:
    """In an open dialog, pick ``choice`` in its select (if given), then press its accept
    button; False when no dialog is open."""
    dialogs = driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog")
    if not dialogs:
        return False
    if choice is not None:
        for option in dialogs[0].find_elements(By.CSS_SELECTOR, "select option"):
            if text_of(option) == choice:
                option.click()
    dialogs[0].find_element(By.CSS_SELECTOR, ".jp-Dialog-button.jp-mod-accept").click()
    return True


def prompts(driver) -> list[str]:
    """The execution prompt of every code cell, in order ("[3]:", "[*]:", "[ ]:")."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell "
        ".jp-InputArea-prompt'), e => e.textContent.trim())")


def texts(driver, selector: str, within=None) -> list[str]:
    return [text_of(e) for e in (within or driver).find_elements(By.CSS_SELECTOR, selector)]


def tracebacks(driver) -> list[str]:
    return [t for t in texts(driver, STDERR) if "Traceback" in t]


def code_cell(driver, *needles: str):
    """The one code cell whose source contains any of ``needles``."""
    cells = [c for c in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell")
             if any(n in "\n".join(texts(driver, ".cm-line", c)) for n in needles)]
    assert len(cells) == 1, f"expected one code cell containing {needles}, found {len(cells)}"
    return cells[0]


def show(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)


def image_sources(cell) -> list[str]:
    return [img.get_attribute("src") for img in
            cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea img")]


def open_notebook(driver, lab: Lab, kernel: str | None) -> None:
    """Load the notebook's page; start ``kernel`` (its display name) or none, by the kernel
    dialog if Lab asks, else by Kernel > Change Kernel…; wait until the notebook shows."""
    driver.get(lab.page(NB_NAME))
    wait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"))
    if kernel is None:
        # Lab may ask which kernel to start, or start the notebook's own: either way, none.
        time.sleep(2)
        if not accept_dialog_if_any(driver, "No Kernel"):
            click_menu(driver, "Kernel", "Change Kernel…")
            wait(driver).until(lambda d: accept_dialog_if_any(d, "No Kernel"))
        wait(driver, 30).until(lambda d: not lab.kernels())
    else:
        wait(driver, 60).until(lambda d: accept_dialog_if_any(d) or kernel_idle(lab))
        wait(driver, 60).until(lambda d: kernel_idle(lab))


def kernel_idle(lab: Lab) -> bool:
    kernels = lab.kernels()
    return len(kernels) == 1 and kernels[0]["execution_state"] == "idle"


WATCH_PROGRESS = """
window.sawProgress = false;
const look = () => { if (document.querySelector(arguments[0])) window.sawProgress = true; };
new MutationObserver(look).observe(document.body, {childList: true, subtree: true});
"""


def run_all(driver, lab: Lab) -> bool:
    """Run > Run All Cells; wait until every code cell has run and the kernel is idle. Fails
    at once if the run stops early (Lab stops at an error). True if a progress-bar widget
    appeared in an output meanwhile."""
    driver.execute_script(WATCH_PROGRESS, PROGRESS)
    click_menu(driver, "Run", "Run All Cells")
    idle_since = [None]

    def finished(d) -> bool:
        shown, idle = prompts(d), kernel_idle(lab)
        if idle and all(re.fullmatch(r"\[\d+\]:", p) for p in shown):
            return True
        if idle and "[*]:" not in shown:  # idle with cells left: stopped, or about to go on
            idle_since[0] = idle_since[0] or time.monotonic()
            if time.monotonic() - idle_since[0] > 10:
                pending = sum(p == "[ ]:" for p in shown)
                pytest.fail(f"Run All stopped with {pending} of {len(shown)} code cells not "
                            "run; errors shown:\n" + "\n".join(tracebacks(d) or texts(d, STDERR)))
        else:
            idle_since[0] = None
        return False
    WebDriverWait(driver, RUN_ALL_LIMIT, poll_frequency=1).until(
        finished, f"Run All did not finish within {RUN_ALL_LIMIT} s")
    return driver.execute_script("return window.sawProgress")


def save_notebook(driver, lab: Lab) -> None:
    """File > Save Notebook; wait until the file on disk changes."""
    before = lab.last_modified(NB_NAME)
    click_menu(driver, "File", "Save Notebook")
    wait(driver, 30).until(lambda d: lab.last_modified(NB_NAME) != before)


def shut_down_kernel(driver, lab: Lab) -> None:
    click_menu(driver, "Kernel", "Shut Down Kernel")
    wait(driver, 30).until(lambda d: accept_dialog_if_any(d) and False or not lab.kernels())


def move_slider(driver, cell) -> None:
    """Focus the slider's handle and press the right arrow once (one step)."""
    handle = wait(driver).until(
        lambda d: cell.find_element(By.CSS_SELECTOR, ".widget-slider .noUi-handle"))
    show(driver, handle)
    handle.click()
    handle.send_keys(Keys.ARROW_RIGHT)


def widgets_settled(driver) -> bool:
    """No widget output is still "Loading widget..."."""
    return not any("Loading widget" in t for t in texts(driver, OUTPUT))


# --------------------------------------------------------------------------- the test
def test_notebook_in_jupyterlab(lab, browser, workdir, screenshots):
    import nbformat
    driver = browser
    open_notebook(driver, lab, kernel="python3")

    # 1. Run All: every cell runs, no error, progress bars as widgets during training.
    saw_progress = run_all(driver, lab)
    training, slider_cell = code_cell(driver, "fit("), code_cell(driver, "IntSlider", "interact")
    show(driver, training)
    screenshots(driver, "1-after-run-all")
    assert tracebacks(driver) == []
    assert saw_progress, "no progress-bar widget appeared in an output during Run All"

    # 2. The slider renders, and moving it changes the figure under it.
    show(driver, slider_cell)
    wait(driver).until(lambda d: slider_cell.find_elements(By.CSS_SELECTOR, ".widget-slider"))
    before = image_sources(slider_cell)
    move_slider(driver, slider_cell)
    wait(driver, 60).until(lambda d: image_sources(slider_cell) not in ([], before),
                           "moving the slider did not change the figure under it")
    show(driver, slider_cell)
    screenshots(driver, "2-after-moving-slider")

    # 3. Save, shut the kernel down, reopen in a fresh tab with no kernel.
    save_notebook(driver, lab)
    saved = nbformat.read(workdir / NB_NAME, as_version=4)
    code = [c for c in saved.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code if c.execution_count is None] == []
    assert [o for c in code for o in c.outputs if o.output_type == "error"] == []
    shut_down_kernel(driver, lab)
    first_tab = driver.current_window_handle
    driver.switch_to.new_window("tab")
    fresh_tab = driver.current_window_handle
    driver.switch_to.window(first_tab)
    driver.close()
    driver.switch_to.window(fresh_tab)
    open_notebook(driver, lab, kernel=None)
    wait(driver, 30).until(widgets_settled, "widget outputs still loading")
    training, slider_cell = code_cell(driver, "fit("), code_cell(driver, "IntSlider", "interact")
    assert prompts(driver) == [f"[{c.execution_count}]:" for c in code]  # nothing re-ran
    show(driver, training)
    screenshots(driver, "3-reopened-training")
    show(driver, slider_cell)
    screenshots(driver, "4-reopened-slider")
    assert not lab.kernels()
    training_text = "\n".join(texts(driver, OUTPUT, training))
    assert WIDGET_ERROR not in training_text, (
        f"the training cell's saved output shows {WIDGET_ERROR!r} without a kernel: "
        f"{training_text[:500]}")
    assert slider_cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea img"), (
        "the slider's cell shows no static figure without a kernel: "
        + "\n".join(texts(driver, OUTPUT, slider_cell))[:500])
