"""The notebook: its setup cell, a headless smoke run, and checks of the committed outputs.

``test_committed_notebook_is_a_full_run`` fails while the committed outputs come from a smoke
run (or are cleared): it passes once the notebook is committed after one full run at 85% or
more.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import http.server
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "EVA8_session6.ipynb"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _nb(path: Path = NOTEBOOK):
    import nbformat
    return nbformat.read(path, as_version=4)


def _cell(nb, tag: str):
    tagged = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged {tag!r}"
    return tagged[0]


def _outputs(nb) -> list:
    return [o for c in nb.cells for o in c.get("outputs", [])]


def _outputs_text(nb) -> str:
    parts = []
    for out in _outputs(nb):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _write_tiny_folder(root: Path, per_class: int) -> None:
    """A tiny image-folder tree of random PNGs in CIFAR-10's layout."""
    from PIL import Image

    from helpers import CIFAR10_CLASSES
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for name in CIFAR10_CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")


def _repository_state() -> tuple:
    """The figures in images/ (name and hash) and, in a git checkout, ``git status``."""
    figures = sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest())
                     for p in (ROOT / "images").glob("*"))
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        status = None
    return figures, status


# --------------------------------------------------------------------------- smoke run
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Execute the notebook as README says a headless smoke run is made: ``--cwd`` the
    repository, ``SMOKE`` and ``INTERACTIVE False``, no figures folder named."""
    papermill = pytest.importorskip("papermill")
    tmp = tmp_path_factory.mktemp("nb")
    _write_tiny_folder(tmp / "data", per_class=60)
    out = tmp / "out.ipynb"
    before = _repository_state()
    # No retry: a cell that hangs is a bug (the time-out only keeps CI from waiting forever).
    papermill.execute_notebook(
        str(NOTEBOOK), str(out), cwd=str(ROOT), kernel_name="python3", progress_bar=False,
        execution_timeout=600, start_timeout=120,
        parameters=dict(DATA_DIR=str(tmp / "data"), DOWNLOAD=False, SMOKE=True,
                        INTERACTIVE=False))
    return _nb(out), before, _repository_state()


def test_smoke_run_finishes_without_errors(smoke_run):
    nb, _, _ = smoke_run
    assert [o for o in _outputs(nb) if o.output_type == "error"] == []
    stderr = [o.text for o in _outputs(nb) if o.output_type == "stream" and o.name == "stderr"]
    assert stderr == []  # no warnings printed


def test_smoke_run_produces_key_outputs(smoke_run):
    nb, _, _ = smoke_run
    text = _outputs_text(nb)
    assert "512 training / 256 test images" in text
    assert "final test accuracy" in text
    assert "downsampling: C2 downsample" in text  # the rule checklist, one row per layer
    assert "measured from gradients" in text
    assert "epoch   1/1" in text  # one log line per epoch
    assert "lowest possible training loss" in text
    assert "class SetupError" not in text and "class Net(nn.Module)" in text  # code shown
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 8


def test_smoke_run_leaves_the_repository_clean(smoke_run):
    """A smoke run never writes figures into images/ (nor anything else into the checkout)."""
    nb, before, after = smoke_run
    assert "figures: not saved" in _outputs_text(nb)
    assert after == before


def test_headless_run_has_no_widgets_or_noise(smoke_run):
    nb, _, _ = smoke_run
    assert not [o for o in _outputs(nb) if WIDGET_MIME in o.get("data", {})]
    assert "widgets" not in nb.metadata
    text = _outputs_text(nb)
    assert "PosixPath(" not in text and "it/s]" not in text
    assert "INTERACTIVE is False" in text


def test_widget_cell_never_runs_its_callback_while_executing(tmp_path):
    """With INTERACTIVE on, the slider cell finishes headless at once and draws nothing."""
    import nbformat
    from nbclient import NotebookClient
    setup = "\n".join([
        "import numpy as np",
        "import matplotlib.pyplot as plt",
        "from IPython.display import display",
        "from helpers import exercise_augmentations, plot_augmentations",
        "x_train = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)",
        "pipeline = exercise_augmentations((0.5, 0.5, 0.5), seed=0)",
        "INTERACTIVE = True",
    ])
    widget = _cell(_nb(), "widget").source
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup),
                                         nbformat.v4.new_code_cell(widget)])
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = nb.cells[1].outputs
    assert any(WIDGET_MIME in o.get("data", {}) for o in outputs)
    assert not any("image/png" in o.get("data", {}) for o in outputs)


# --------------------------------------------------------------------------- setup cell
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_helpers(tmp_path):
    """helpers.py served over HTTP on 127.0.0.1; yields its URL."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(ROOT / "helpers.py", served / "helpers.py")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/helpers.py"
    server.shutdown()
    server.server_close()


def _run_setup_cell(folder: Path, url: str, then: str | None = None):
    """Run the notebook's setup cell, with HELPERS_URL set to ``url``, in ``folder``."""
    import nbformat
    from nbclient import NotebookClient
    source = _cell(_nb(), "setup").source
    source, n = re.subn(r"^HELPERS_URL = .*$", f"HELPERS_URL = {url!r}", source, flags=re.M)
    assert n == 1
    cells = [nbformat.v4.new_code_cell(source)]
    if then:
        cells.append(nbformat.v4.new_code_cell(then))
    nb = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(folder)}}).execute()
    return nb


def test_setup_cell_fetches_helpers_when_missing(tmp_path, served_helpers):
    folder = tmp_path / "fresh"
    folder.mkdir()
    nb = _run_setup_cell(folder, served_helpers,
                         then="import helpers\nprint('imported', helpers.__file__)")
    assert [o for o in _outputs(nb) if o.output_type == "error"] == []
    assert (folder / "helpers.py").read_bytes() == (ROOT / "helpers.py").read_bytes()
    text = _outputs_text(nb)
    assert "fetched helpers.py from " + served_helpers in text
    assert f"imported {folder / 'helpers.py'}" in text


def test_setup_cell_ends_with_a_clear_message_when_the_fetch_fails(tmp_path):
    folder = tmp_path / "fresh"
    folder.mkdir()
    dead = f"http://127.0.0.1:{_free_port()}/helpers.py"
    nb = _run_setup_cell(folder, dead)
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert len(errors) == 1
    err = errors[0]
    assert err.ename == "SetupError"
    assert len(err.traceback) == 1  # the message alone, no traceback
    message = err.traceback[0]
    assert message.startswith("Setup stopped: helpers.py is not in")
    assert dead in message and "Put helpers.py from https://github.com/" in message
    assert "Traceback" not in message
    assert not (folder / "helpers.py").exists()


def _github_repo() -> str:
    match = re.search(r'^GITHUB_REPO = "([^"]+)"', _cell(_nb(), "setup").source, flags=re.M)
    assert match, "the setup cell holds GITHUB_REPO"
    return match.group(1)


def test_repository_address_is_the_same_everywhere():
    repo = _github_repo()
    badge = re.compile(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/")
    readme = badge.findall((ROOT / "README.md").read_text())
    first_cell = badge.findall(_nb().cells[0].source)
    assert readme and first_cell
    assert set(readme) == set(first_cell) == {repo}
    assert "{GITHUB_REPO}" in _cell(_nb(), "setup").source.split("HELPERS_URL = ")[1]


# --------------------------------------------------------------------------- notebook source
def test_parameters_cell_names_and_units():
    cell = _cell(_nb(), "parameters")
    lines = [ln for ln in cell.source.splitlines() if ln and not ln.startswith("#")]
    names = [ln.split("=")[0].strip() for ln in lines]
    assert names[:1] == ["RECIPE"]
    assert {"SMOKE", "EPOCHS", "FIGURES_DIR", "INTERACTIVE", "SEED", "DATA_DIR"} <= set(names)
    assert all(n.isupper() for n in names)
    assert all("#" in ln for ln in lines)  # every parameter says what it is


def test_one_import_cell_and_no_unused_imports():
    nb = _nb()
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    helper_imports = [s for s in code if "from helpers import" in s]
    assert len(helper_imports) == 1
    imports = helper_imports[0]
    tree = ast.parse(imports)
    is_import = (ast.Import, ast.ImportFrom)
    names = [a.asname or a.name.split(".")[0] for node in tree.body
             if isinstance(node, is_import) for a in node.names]
    rest = "\n".join([s for s in code if s is not imports]
                     + [ast.unparse(n) for n in tree.body if not isinstance(n, is_import)])
    unused = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", rest)]
    assert unused == []


def test_structure_markdown_before_code_seed_and_about_last():
    cells = [c for c in _nb().cells if "injected-parameters" not in c.metadata.get("tags", [])]
    assert all(prev.cell_type == "markdown" for prev, c in zip(cells, cells[1:])
               if c.cell_type == "code")
    code = [c.source for c in cells if c.cell_type == "code"]
    assert code.count("set_seed(SEED)") == 2  # in cells of their own
    train = next(i for i, s in enumerate(code) if "fit(" in s)
    assert code[train - 1] == "set_seed(SEED)"
    assert cells[-1].cell_type == "code" and "about" in cells[-1].source
    assert cells[-2].source.startswith("## About this run")
    headings = [c.source.split("\n")[0] for c in cells if c.cell_type == "markdown"
                and c.source.startswith("## ")]
    numbered = [h for h in headings if re.match(r"## \d+\. ", h)]
    assert [int(h.split()[1].rstrip(".")) for h in numbered] == list(range(1, len(numbered) + 1))
    assert "Summary and exercises" in numbered[-1]


def test_notebook_speaks_of_old_argument_names_consistently():
    """Everywhere: since 2.0, an old argument name is ignored with only a warning."""
    import helpers
    text = "\n".join(c.source for c in _nb().cells)
    assert "ignored with only a warning" in text
    assert "keep_ratio=True" in text
    notes = " ".join(row[2] for row in helpers.AUGMENTATION_MAPPING)
    assert "ignored with only a warning" in notes
    for wrong in ("old ones fail silently", "2.x ignores the old names"):
        assert wrong not in text and wrong not in notes


# --------------------------------------------------------------------------- committed outputs
def test_committed_notebook_ran_once_in_order():
    code = [c for c in _nb().cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))


def test_committed_notebook_has_no_errors_or_stderr():
    for cell in _nb().cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", cell.source[:80]
            assert not (out.output_type == "stream" and out.name == "stderr"), out.text[:200]


def test_committed_notebook_has_no_noise():
    nb = _nb()
    assert "widgets" not in nb.metadata  # no stale progress-bar or slider state
    assert not [o for o in _outputs(nb) if WIDGET_MIME in o.get("data", {})]
    text = _outputs_text(nb)
    assert "PosixPath(" not in text and "it/s]" not in text


def test_committed_notebook_has_parameters_cell_and_no_local_paths():
    nb = _nb()
    _cell(nb, "parameters")
    text = _outputs_text(nb) + "".join(c.source for c in nb.cells)
    for local in ("/work/", "/tmp/", "/root/", "/home/", str(ROOT)):
        assert local not in text


def test_committed_notebook_is_a_full_run():
    """Fails until the committed outputs come from one full run at 85% or more.

    Reads "About this run", the notebook's last output: not a smoke run, all 10,000 test
    images, final test accuracy of at least 85%.
    """
    about = "".join(o.get("text", "") for o in _nb().cells[-1].get("outputs", []))
    assert about, "the committed notebook has no 'About this run' output: run it in full"
    assert "smoke run: False" in about, ("the committed outputs come from a smoke run: "
                                         "commit the notebook after a full run")
    assert re.search(r"/ 10,000 test images", about), "not evaluated on the whole test set"
    match = re.search(r"final test accuracy: ([\d.]+)%", about)
    assert match and float(match.group(1)) >= 85.0, about
