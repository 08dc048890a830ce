"""The notebook: its setup cell, headless smoke runs (plain and interactive), that it trains
as the command line does, and checks of the committed outputs.

``test_committed_notebook_is_a_full_run`` fails while the committed outputs come from a smoke
run (or are cleared): it passes once the notebook is committed after one full run at 85% or
more, made with the parameters a Colab user gets.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, env, helpers_cmd

NOTEBOOK = REPO / "EVA8_session6.ipynb"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# What a Colab user gets: the parameters cell as committed.
COLAB = dict(RECIPE="standard", EPOCHS=None, SEED=0, PRETRAINED=False, SMOKE=False,
             INTERACTIVE=True, DOWNLOAD=True, DATA_DIR="data")


def _nb(path: Path = NOTEBOOK):
    import nbformat
    return nbformat.read(path, as_version=4)


def _cell(nb, tag: str):
    tagged = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged {tag!r}"
    return tagged[0]


def _code_with(nb, text: str):
    found = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    assert len(found) == 1, f"expected one code cell holding {text!r}"
    return found[0]


def _outputs(nb) -> list:
    return [o for c in nb.cells for o in c.get("outputs", [])]


def _text(outputs) -> str:
    return "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                     for o in outputs)


def _write_tiny_folder(root: Path, per_class: int) -> None:
    """A tiny image-folder tree of random PNGs in CIFAR-10's layout."""
    from PIL import Image

    from helpers import CIFAR10_CLASSES
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i:04d}.png")


def _repository_state() -> tuple:
    """The figures in images/ (name and hash) and, in a git checkout, ``git status``."""
    figures = sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest())
                     for p in (REPO / "images").glob("*"))
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                                cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        status = None
    return figures, status


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nbdata") / "data"
    _write_tiny_folder(root, per_class=60)
    return root


def _smoke(tmp_path_factory, tiny_data, **parameters):
    """The notebook run as README says a headless smoke run is made (``--cwd`` the
    repository, ``SMOKE``, no figures folder named), with ``parameters``."""
    papermill = pytest.importorskip("papermill")
    out = tmp_path_factory.mktemp("nb") / "out.ipynb"
    before = _repository_state()
    papermill.execute_notebook(  # no retry: a cell that hangs is a bug
        str(NOTEBOOK), str(out), cwd=str(REPO), kernel_name="python3", progress_bar=False,
        execution_timeout=600, start_timeout=120,
        parameters=dict(DATA_DIR=str(tiny_data), DOWNLOAD=False, SMOKE=True, **parameters))
    return _nb(out), before, _repository_state()


@pytest.fixture(scope="module")
def headless(tmp_path_factory, tiny_data):
    return _smoke(tmp_path_factory, tiny_data, INTERACTIVE=False)


@pytest.fixture(scope="module")
def interactive(tmp_path_factory, tiny_data):
    return _smoke(tmp_path_factory, tiny_data, RESUME=True)  # INTERACTIVE as committed: True


# --------------------------------------------------------------------------- smoke runs
@pytest.mark.slow
def test_smoke_runs_finish_without_errors_or_warnings(headless, interactive):
    for nb, _, _ in (headless, interactive):
        assert [o for o in _outputs(nb) if o.output_type == "error"] == []
        assert [o.text for o in _outputs(nb) if o.get("name") == "stderr"] == []
    assert "RESUME is ignored: no checkpoint is kept" in _text(_outputs(interactive[0]))


@pytest.mark.slow
def test_smoke_run_shows_what_the_text_promises(headless):
    nb, _, _ = headless
    text = _text(_outputs(nb))
    assert "512 training / 256 test images" in text and "final test accuracy" in text
    assert "downsampling: C2 downsample" in text and "every rule holds" in text
    assert "receptive field from the table: 81 pixels; measured from gradients: 81" in text
    assert "epoch   1/1" in text and "lowest possible training loss" in text
    shown = _text(_code_with(nb, "train_step, train_one_epoch, fit)").outputs)
    assert "def train_step(" in shown and "def fit(" in shown  # the real code, shown
    assert "class Net(nn.Module)" in text and "class SetupError" not in text
    pipeline = _code_with(nb, "for image in x_train[examples[:5]]").outputs
    assert any("image/png" in o.get("data", {}) for o in pipeline)


@pytest.mark.slow
def test_the_printed_cutout_fill_is_what_the_pixels_get(headless):
    import helpers
    nb, _, _ = headless
    match = re.search(r"cutout fill \(red, green, blue\) = \((\d+), (\d+), (\d+)\)",
                      _text(_outputs(nb)))
    means = re.search(r"red\s+([\d.]+).*\ngreen\s+([\d.]+).*\nblue\s+([\d.]+)",
                      _text(_code_with(nb, "compute_mean_std(x_train)").outputs))
    mean = [float(m) for m in means.groups()]
    cut = helpers.exercise_augmentations(mean, 0, 0, 1, seed=0)(
        image=np.zeros((32, 32, 3), np.uint8))["image"]
    assert tuple(int(v) for v in match.groups()) == tuple(int(v) for v in cut.max((0, 1)))


@pytest.mark.slow
def test_smoke_runs_leave_the_repository_clean(headless, interactive):
    """A smoke run never writes figures into images/ (nor anything else into the checkout)."""
    for _, before, after in (headless, interactive):
        assert after == before


@pytest.mark.slow
def test_headless_run_has_no_widgets_or_noise(headless):
    nb, _, _ = headless
    assert not [o for o in _outputs(nb) if WIDGET_MIME in o.get("data", {})]
    assert nb.metadata.get("widgets") == _nb().metadata.get("widgets")  # none of its own
    text = _text(_outputs(nb))
    assert "PosixPath(" not in text and "it/s]" not in text


@pytest.mark.slow
def test_interactive_run_leaves_text_where_a_progress_bar_was(interactive):
    """Only the slider stays a widget (with a static figure beside it); a finished progress
    bar leaves a line of text, so a saved notebook shows no "Error displaying widget"."""
    nb, _, _ = interactive
    slider = _cell(nb, "widget").outputs
    assert [o for o in slider if WIDGET_MIME in o.get("data", {})]
    assert [o for o in slider if "image/png" in o.get("data", {})]
    others = [o for c in nb.cells if "widget" not in c.metadata.get("tags", [])
              for o in c.get("outputs", [])]
    assert not [o for o in others if WIDGET_MIME in o.get("data", {})]
    assert re.search(r"epoch 1/1: (\d+)/\1 batches in \d+ s", _text(_code_with(nb, "fit(").outputs))


@pytest.mark.slow
def test_the_notebook_trains_as_the_command_line_does(headless, tiny_data, tmp_path):
    """The same data, seed and subsets give the same model: the notebook's final accuracy
    is the command's, to every printed digit."""
    nb, _, _ = headless
    res = subprocess.run(helpers_cmd("train", "--data-dir", tiny_data, "--epochs", "1",
                                     "--train-subset", "512", "--test-subset", "256",
                                     "--out", tmp_path / "run", "--no-progress"),
                         env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    text = _text(_outputs(nb))
    assert f"final test accuracy: {100 * summary['final_test_acc']:.2f}%" in text
    assert f"with flip TTA: {100 * summary['final_test_acc_flip_tta']:.2f}%" in text
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert f"train loss {log['train_loss']:.3f}" in text


@pytest.mark.slow
def test_pretrained_weights_are_analysed_without_training(tmp_path_factory, tiny_data):
    weights = sorted((REPO / "weights").glob("*-s0.pt"))
    assert weights, "no committed weights in weights/"
    recipe = weights[0].name.split("-s0")[0]
    nb, before, after = _smoke(tmp_path_factory, tiny_data, INTERACTIVE=False,
                               PRETRAINED=True, RECIPE=recipe, SEED=3, EPOCHS=2)
    assert [o for o in _outputs(nb) if o.output_type == "error"] == []
    text = _text(_outputs(nb))
    assert f"loaded weights/{recipe}-s0.pt: {recipe}, seed 0" in text and "epoch   1/" not in text
    assert "loading took" in text and after == before
    import helpers  # the settings reported are the weights', not SEED's and EPOCHS'
    epochs = helpers.RECIPES[recipe].epochs
    assert f"(recipe {recipe!r}, {epochs} epochs, seed 0)" in text, text
    assert "judged on all of it" in text and "target of 85%" not in text  # 256 images


def test_widget_cell_never_runs_its_callback_while_executing(tmp_path):
    """With INTERACTIVE on, the slider cell finishes headless at once: its static figure and
    the slider, nothing drawn by the slider's callback."""
    import nbformat
    from nbclient import NotebookClient
    setup = "\n".join([
        "import numpy as np", "import matplotlib.pyplot as plt",
        "from IPython.display import display",
        "from helpers import exercise_augmentations, plot_pipeline",
        "x_train = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)",
        "pipeline = exercise_augmentations((0.5, 0.5, 0.5), seed=0, record=True)",
        "examples = list(range(6))", "INTERACTIVE = True"])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup),
                                         nbformat.v4.new_code_cell(_cell(_nb(), "widget").source)])
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = nb.cells[1].outputs
    assert sum(WIDGET_MIME in o.get("data", {}) for o in outputs) == 1
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the static copy only


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
    shutil.copy(REPO / "helpers.py", served / "helpers.py")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/helpers.py"
    server.shutdown()
    server.server_close()


def _run_setup_cell(folder: Path, url: str, then: str | None = None):
    """Run the notebook's setup cell, with HELPERS_URL set to ``url``, in ``folder``."""
    import nbformat
    from nbclient import NotebookClient
    source, n = re.subn(r"^HELPERS_URL = .*$", f"HELPERS_URL = {url!r}",
                        _cell(_nb(), "setup").source, flags=re.M)
    assert n == 1
    cells = [nbformat.v4.new_code_cell(source)] + ([nbformat.v4.new_code_cell(then)] if then
                                                   else [])
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
    assert (folder / "helpers.py").read_bytes() == (REPO / "helpers.py").read_bytes()
    text = _text(_outputs(nb))
    assert "fetched helpers.py from " + served_helpers in text
    assert f"imported {folder / 'helpers.py'}" in text


def test_setup_cell_ends_with_a_clear_message_when_the_fetch_fails(tmp_path):
    folder = tmp_path / "fresh"
    folder.mkdir()
    dead = f"http://127.0.0.1:{_free_port()}/helpers.py"
    errors = [o for o in _outputs(_run_setup_cell(folder, dead)) if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "SetupError"
    assert len(errors[0].traceback) == 1  # the message alone, no traceback
    message = errors[0].traceback[0]
    assert message.startswith("Setup stopped: helpers.py is not in")
    assert dead in message and "Put helpers.py from https://github.com/" in message
    assert not (folder / "helpers.py").exists()


def test_setup_cell_names_what_this_kernel_lacks(tmp_path):
    """A Jupyter whose kernel lacks torch stops at setup with one message saying so."""
    source = _cell(_nb(), "setup").source.replace('("torch",', '("no_such_module_here", "torch",')
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert len(errors) == 1 and "lacks no_such_module_here" in errors[0].traceback[0]
    assert "pip install -r requirements.txt" in errors[0].traceback[0]


def _github_repo() -> str:
    match = re.search(r'^GITHUB_REPO = "([^"]+)"', _cell(_nb(), "setup").source, flags=re.M)
    assert match, "the setup cell holds GITHUB_REPO"
    return match.group(1)


def test_repository_address_is_the_same_everywhere():
    badge = re.compile(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/")
    readme = badge.findall((REPO / "README.md").read_text())
    first_cell = badge.findall(_nb().cells[0].source)
    assert readme and first_cell and set(readme) == set(first_cell) == {_github_repo()}


# --------------------------------------------------------------------------- notebook source
def _parameters(nb) -> dict:
    tree = ast.parse(_cell(nb, "parameters").source)
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body}


def test_parameters_cell_names_units_and_colabs_values():
    nb = _nb()
    lines = [ln for ln in _cell(nb, "parameters").source.splitlines() if ln.strip()]
    assert all(ln.split("=")[0].strip().isupper() and "#" in ln for ln in lines)
    params = _parameters(nb)
    assert {k: params[k] for k in COLAB} == COLAB
    assert not [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]


def test_one_import_cell_and_no_unused_imports():
    code = [c.source for c in _nb().cells if c.cell_type == "code"]
    helper_imports = [s for s in code if "from helpers import" in s]
    assert len(helper_imports) == 1
    imports = helper_imports[0]
    tree = ast.parse(imports)
    is_import = (ast.Import, ast.ImportFrom)
    names = [a.asname or a.name.split(".")[0] for node in tree.body
             if isinstance(node, is_import) for a in node.names]
    rest = "\n".join([s for s in code if s is not imports]
                     + [ast.unparse(n) for n in tree.body if not isinstance(n, is_import)])
    assert [n for n in names if not re.search(rf"\b{re.escape(n)}\b", rest)] == []


def test_structure_and_one_cell_building_the_model_that_trains():
    cells = _nb().cells
    assert all(prev.cell_type == "markdown" for prev, c in zip(cells, cells[1:])
               if c.cell_type == "code")
    code = [c.source for c in cells if c.cell_type == "code"]
    built = [s for s in code if re.search(r"^model = ", s, flags=re.M)]
    assert len(built) == 1 and built[0].startswith("set_seed(SEED)\nmodel = build_model(")
    assert not [s for s in code if "assert " in s]  # a failed rule is reported, not raised
    assert cells[-1].cell_type == "code" and "about" in cells[-1].source
    assert cells[-2].source.startswith("## About this run")
    headings = [c.source.split("\n")[0] for c in cells if c.cell_type == "markdown"
                and c.source.startswith("## ")]
    numbered = [h for h in headings if re.match(r"## \d+\. ", h)]
    assert [int(h.split()[1].rstrip(".")) for h in numbered] == list(range(1, len(numbered) + 1))
    assert "Summary and exercises" in numbered[-1]


def test_each_exercise_names_the_cell_to_change_and_what_to_look_at():
    text = next(c.source for c in _nb().cells if c.source.startswith("## 9. Summary"))
    exercises = re.split(r"\n\d\. ", text.split("**Exercises**")[1])[1:]
    assert len(exercises) >= 5
    for ex in exercises:
        assert re.search(r"\*[A-Z][a-z]+ cell\*", ex) and re.search(r"[Ll]ook\s+at", ex), ex


def test_notebook_speaks_of_old_argument_names_consistently():
    """Everywhere: since 2.0, an old argument name is ignored with only a warning."""
    import helpers
    text = "\n".join(c.source for c in _nb().cells)
    notes = " ".join(row[2] for row in helpers.AUGMENTATION_MAPPING)
    assert "ignored with only a warning" in text and "ignored with only a warning" in notes
    assert "keep_ratio=True" in text


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
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json",
                                               {}).get("state", {})
    kinds = {model["model_name"] for model in state.values()}  # the slider's, kept to draw it
    assert kinds <= {"VBoxModel", "IntSliderModel", "OutputModel", "LayoutModel",
                     "SliderStyleModel"}, kinds  # no progress bars left
    widgets = [c for c in nb.cells if any(WIDGET_MIME in o.get("data", {})
                                          for o in c.get("outputs", []))]
    assert widgets == [_cell(nb, "widget")]  # the slider only, beside its static figure
    text = _text(_outputs(nb))
    assert "PosixPath(" not in text and "it/s]" not in text


def test_committed_notebook_has_no_local_paths():
    nb = _nb()
    text = _text(_outputs(nb)) + "".join(c.source for c in nb.cells)
    for local in ("/work/", "/tmp/", "/root/", "/home/", str(REPO)):
        assert local not in text


def _about() -> str:
    return "".join(o.get("text", "") for o in _nb().cells[-1].get("outputs", []))


def test_committed_notebook_is_a_full_run():
    """Fails until the committed outputs come from one full run at 85% or more."""
    about = _about()
    assert about, "the committed notebook has no 'About this run' output: run it in full"
    assert "smoke run: False" in about, "the committed outputs come from a smoke run"
    assert "pretrained False" in about and "/ 10,000 test images" in about
    match = re.search(r"final test accuracy: ([\d.]+)%", about)
    assert match and float(match.group(1)) >= 85.0, about


def test_the_texts_figures_agree_with_the_run_and_readme():
    nb = _nb()
    minutes = re.search(r"that took (\d+) minutes", nb.cells[0].source)
    trained = re.search(r"training time: ([\d.]+) min", _about())
    assert minutes and trained and abs(int(minutes.group(1)) - float(trained.group(1))) <= 0.5
    results = next(c.source for c in nb.cells if c.source.startswith("## 8. Results"))
    spread = re.search(r"ended at ([\d.]+ ± [\d.]+)%", results)
    assert spread and spread.group(1) in (REPO / "README.md").read_text()


def test_committed_notebook_shows_the_current_code():
    """The blocks, the net, Muon, the training step and loop are shown as helpers.py has them."""
    import inspect

    import helpers
    nb = _nb()
    shown = _text(_code_with(nb, "train_step, train_one_epoch, fit)").outputs) + _text(
        _code_with(nb, "for part in (InputNorm").outputs)
    for part in (helpers.Training, helpers.orthogonalise, helpers.MuonSGD, helpers.start_training,
                 helpers.train_step, helpers.train_one_epoch, helpers.fit, helpers.InputNorm,
                 helpers.Net, helpers.ConvBNAct, helpers.DepthwiseSeparable, helpers.Residual):
        assert inspect.getsource(part).strip() in shown, part.__name__
