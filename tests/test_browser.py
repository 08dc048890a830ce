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

Run it with ``.venv/bin/python -m pytest -s -m browser tests/test_browser.py`` (one to
two minutes on 2 CPU cores; ``-m 'not browser'`` or ``-m 'not slow'`` leaves it out).
It needs ``chromium`` and ``chromedriver`` on PATH (Debian: ``apt-get install chromium
chromium-driver``) and ``jupyterlab``, ``jupyterlab_widgets`` and ``selenium`` in the venv
(``.ci/run`` installs them); without them it is skipped, saying what is missing.
JupyterLab listens on 127.0.0.1 only, with a token; Chromium resolves no host but 127.0.0.1.
Screenshots of each stage go to ``$BROWSER_SCREENSHOTS`` if set, else to pytest's tmp_path;
their paths are printed (``-s`` shows them).
"""
from __future__ import annotations

import contextlib
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

import psutil  # noqa: E402  (ipykernel's dependency)
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
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
           "IPYTHONDIR": str(home / "ipython"),
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
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
        processes = psutil.Process(driver.service.process.pid).children(recursive=True)
        driver.quit()  # returns before all of Chromium's processes have exited: wait for them
        _, alive = psutil.wait_procs(processes, timeout=10)
        for p in alive:
            p.kill()


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
    for _ in range(3):  # a click on the bar may close a menu left open: then click again
        wait(driver).until(lambda d: by_text(d, ".lm-MenuBar-item", menu)).click()
        try:
            label = wait(driver, 3).until(lambda d: by_text(d, ".lm-Menu-itemLabel", item))
            break
        except TimeoutException:
            continue
    else:
        pytest.fail(f"no item {item!r} in the {menu} menu")
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
    """Scroll ``element``'s top into view and wait until it stays there (cells above it may
    change height as they are drawn)."""
    last_top = [None]

    def in_place(d) -> bool:
        top, height = d.execute_script("return [arguments[0].getBoundingClientRect().top, "
                                       "window.innerHeight]", element)
        if 0 <= top < height / 2 and top == last_top[0]:
            return True
        if not 0 <= top < height / 2:
            d.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
        last_top[0] = top
        return False
    wait(driver, 20).until(in_place, "could not scroll a cell into view")


def image_sources(cell) -> list[str]:
    return [img.get_attribute("src") for img in
            cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea img")]


def open_notebook(driver, lab: Lab, cells: int, with_kernel: bool) -> None:
    """Load the notebook's page and wait until its ``cells`` cells show. Lab starts the
    notebook's kernel, or asks which to start: then accept it (``with_kernel``), or choose
    "No Kernel" in that dialog or in Kernel > Change Kernel…"""
    driver.get(lab.page(NB_NAME))
    wait(driver, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")) == cells)
    wait(driver, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Dialog") or kernel_idle(lab))
    if with_kernel:
        accept_dialog_if_any(driver)
        wait(driver, 60).until(lambda d: kernel_idle(lab))
    else:
        if not accept_dialog_if_any(driver, "No Kernel"):
            click_menu(driver, "Kernel", "Change Kernel…")
            wait(driver).until(lambda d: accept_dialog_if_any(d, "No Kernel"))
        wait(driver, 30).until(lambda d: not lab.kernels())


def kernel_idle(lab: Lab) -> bool:
    kernels = lab.kernels()
    return len(kernels) == 1 and kernels[0]["execution_state"] == "idle"


WATCH_PROGRESS = """
const selector = arguments[0];
window.sawProgress = false;
const look = () => { if (document.querySelector(selector)) window.sawProgress = true; };
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
    wait(driver, 30).until(lambda d: accept_dialog_if_any(d) or not lab.kernels())
    wait(driver, 30).until(lambda d: not lab.kernels())


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


def fresh_tab(driver) -> None:
    """Open a new tab and close the old one (the next page load starts from nothing)."""
    old = driver.current_window_handle
    driver.switch_to.new_window("tab")
    new = driver.current_window_handle
    driver.switch_to.window(old)
    driver.close()
    driver.switch_to.window(new)


# --------------------------------------------------------------------------- the test
def check_run_all(driver, lab: Lab, save) -> list[str]:
    """Run All: every cell runs with no traceback; progress bars render as widgets."""
    problems = []
    saw_progress = run_all(driver, lab)
    show(driver, code_cell(driver, "fit("))
    save("1-after-run-all")
    problems += [f"a traceback in an output: {t[:300]}" for t in tracebacks(driver)]
    if not saw_progress:
        problems.append("no progress-bar widget appeared in an output during Run All")
    return problems


def check_slider(driver, save) -> list[str]:
    """The slider renders, and moving it changes the figure under it."""
    cell = code_cell(driver, "IntSlider", "interact")
    show(driver, cell)
    try:
        wait(driver).until(
            lambda d: cell.find_elements(By.CSS_SELECTOR, f"{OUTPUT} .widget-slider"))
    except TimeoutException:
        return ["the slider's cell shows no slider widget"]
    before = image_sources(cell)
    move_slider(driver, cell)
    try:
        wait(driver, 60).until(lambda d: image_sources(cell) not in ([], before))
    except TimeoutException:
        return ["moving the slider did not change the figure under it"]
    finally:
        show(driver, cell)
        save("2-after-moving-slider")
    return []


def check_saved_without_kernel(driver, lab: Lab, workdir: Path, save) -> list[str]:
    """Save, shut the kernel down, reopen in a fresh tab with no kernel: the saved outputs
    show no widget error in the training cell and a static figure in the slider's cell."""
    import nbformat
    problems = []
    save_notebook(driver, lab)
    saved = nbformat.read(workdir / NB_NAME, as_version=4)
    code = [c for c in saved.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "the saved notebook has cells not run"
    problems += [f"an error output in the saved notebook: {o.ename}: {o.evalue}"
                 for c in code for o in c.outputs if o.output_type == "error"]
    shut_down_kernel(driver, lab)
    fresh_tab(driver)
    open_notebook(driver, lab, len(saved.cells), with_kernel=False)
    wait(driver, 30).until(widgets_settled, "widget outputs still say 'Loading widget...'")
    assert not lab.kernels()
    assert prompts(driver) == [f"[{c.execution_count}]:" for c in code]  # nothing ran again
    training, slider = code_cell(driver, "fit("), code_cell(driver, "IntSlider", "interact")
    show(driver, training)
    save("3-reopened-training")
    show(driver, slider)
    save("4-reopened-slider")
    training_text = "\n".join(texts(driver, OUTPUT, training))
    if WIDGET_ERROR in training_text:
        problems.append(f"reopened without a kernel, the training cell's output shows "
                        f"{WIDGET_ERROR!r}:\n{training_text[:400]}")
    if not slider.find_elements(By.CSS_SELECTOR, ".jp-OutputArea img"):
        problems.append("reopened without a kernel, the slider's cell shows no static figure "
                        "(no img in its output): "
                        + "\n".join(texts(driver, OUTPUT, slider))[:400])
    return problems


def test_notebook_in_jupyterlab(lab, browser, workdir, screenshots):
    """The three stages of the module docstring. Checks of the notebook's behaviour are
    gathered and reported together; a harness step that fails (a menu, a wait) stops the test
    at once, with a screenshot of the page."""
    import nbformat
    driver = browser
    save = lambda name: screenshots(driver, name)  # noqa: E731
    try:
        open_notebook(driver, lab, len(nbformat.read(workdir / NB_NAME, as_version=4).cells),
                      with_kernel=True)
        problems = check_run_all(driver, lab, save)
        problems += check_slider(driver, save)
        problems += check_saved_without_kernel(driver, lab, workdir, save)
    except BaseException:
        with contextlib.suppress(Exception):  # the page as it was, if the browser still answers
            save("failed")
        raise
    assert not problems, "\n".join(problems)
