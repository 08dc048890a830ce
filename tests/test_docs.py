"""README.md is a product page, EXPERIMENTS.md the research log; requirements match the code."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXPERIMENTS = (ROOT / "EXPERIMENTS.md").read_text()
NOTEBOOK_TEXT = "\n".join("".join(c["source"]) for c in json.loads(
    (ROOT / "EVA8_session6.ipynb").read_text())["cells"] if c["cell_type"] == "markdown")


def test_readme_sections_in_order():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    assert headings[:5] == ["The two commands", "Results", "Figures", "Data",
                            "What `helpers.py` offers"]
    assert "Tests" in headings
    intro = README.split("\n## ")[0]
    assert "colab-badge.svg" in intro  # what it is, then Open in Colab, then the commands


def test_readme_two_commands_run_on_a_fresh_clone():
    section = README.split("## The two commands")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and all(len(b.strip().splitlines()) == 1 for b in blocks)
    main, tests = (b.strip() for b in blocks)
    assert main.startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt")
    assert "helpers.py train" in main and "--download" in main
    assert tests.endswith("-m pytest -q tests")


def test_readme_figures_exist():
    figures = re.findall(r"\]\((images/[^)]+)\)", README)
    assert figures
    for fig in figures:
        assert (ROOT / fig).is_file(), fig


@pytest.mark.parametrize("name, text", [("README.md", README), ("EXPERIMENTS.md", EXPERIMENTS),
                                        ("the notebook's text", NOTEBOOK_TEXT)])
def test_docs_do_not_speak_of_how_the_work_was_organised(name, text):
    for pattern in (r"\bloans?\b", r"device (time|minutes)", r"\bissue \d", r"\btarget \d",
                    r"\bsessions?\b(?![- ]6)", r"\bI stopped\b", r"minutes of device"):
        assert not re.search(pattern, text, flags=re.I), (name, pattern)


def test_experiments_is_the_research_log():
    assert EXPERIMENTS.startswith("# Research log")
    assert "## Model v1 (before the redesign)" in EXPERIMENTS


def test_requirements_floors_match_the_code():
    reqs = dict(re.findall(r"^([A-Za-z0-9_-]+)>=([\d.]+)", (ROOT / "requirements.txt").read_text(),
                           flags=re.M))
    version = lambda v: tuple(int(p) for p in v.split("."))  # noqa: E731
    assert version(reqs["torch"]) >= (2, 3)  # torch.amp.GradScaler("cuda")
    assert version(reqs["albumentations"]) >= (2, 0)  # fill=, *_range, Compose(seed=)


def test_readme_results_table_matches_the_recipes():
    import helpers
    section = README.split("## Results")[1].split("\n## ")[0]
    rows = {m[0]: m[1:] for m in re.findall(
        r"^\| `(\w+)`[^|]*\| ([\d,]+) \| ([\d.]+) M \| (\d+) \|", section, flags=re.M)}
    assert set(rows) == set(helpers.RECIPES)
    for name, (params, macs, epochs) in rows.items():
        model = helpers.build_model(helpers.RECIPES[name])
        assert int(params.replace(",", "")) == helpers.count_parameters(model), name
        assert float(macs) == round(helpers.count_macs(model) / 1e6, 1), name
        assert int(epochs) == helpers.RECIPES[name].epochs, name


def test_readme_names_every_public_helper():
    """"What helpers.py offers" names each name of ``helpers.__all__``, and only those."""
    import helpers
    section = README.split("## What `helpers.py` offers")[1].split("\n## ")[0]
    section = section.split("**The notebook headless**")[0]
    named = set(re.findall(r"`([A-Za-z_]\w*)[`(]", section))
    assert sorted(set(helpers.__all__) - named) == []
    other = {"Affine", "ShiftScaleRotate", "CoarseDropout"}  # albumentations' names
    assert sorted(named - set(helpers.__all__) - other) == []


def test_readme_is_a_short_product_page():
    assert len(README.splitlines()) <= 200


def test_every_guard_row_names_tests_that_exist():
    """Each row of "What it guards against" names at least one test, and each one exists."""
    section = README.split("## What it guards against")[1].split("\n## ")[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| Fault")]
    assert len(rows) >= 15
    for row in rows:
        names, current = [], None
        for ref in re.findall(r"`((?:test_\w+\.py)?::test_\w+)`", row):
            file, _, test = ref.partition("::")
            current = file or current
            names.append((current, test))
        assert names, row
        for file, test in names:
            assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), flags=re.M), \
                (file, test)


@pytest.mark.parametrize("name, text", [("README.md", README), ("EXPERIMENTS.md", EXPERIMENTS),
                                        ("the notebook's text", NOTEBOOK_TEXT)])
def test_no_placeholder_is_left(name, text):
    assert not re.findall(r"__[A-Z][A-Z_]+__", text), name
