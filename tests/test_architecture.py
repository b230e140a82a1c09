"""The layer contract (import-linter) holds and catches a reach-back; the public API shows its signatures."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(source_root: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], capture_output=True, text=True,
                          cwd=source_root, env={"PYTHONPATH": str(source_root), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_layers_point_down():
    result = lint_imports(REPO / "src", REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_a_reach_back_breaks_the_contract(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(REPO / "src" / "klgrade", copy / "klgrade", ignore=shutil.ignore_patterns("*.safetensors", "*.png"))
    (copy / "klgrade" / "data" / "reach_back.py").write_text("from klgrade.train.fit import fit\n")
    result = lint_imports(copy, REPO / "pyproject.toml")
    assert result.returncode == 1
    assert "klgrade.data.reach_back -> klgrade.train.fit" in result.stdout


def test_public_api_exports_real_functions_and_types():
    import klgrade
    from klgrade import Grading, ImageReadError, KLGradeError, grade, load_model

    assert issubclass(ImageReadError, KLGradeError)
    parameters = inspect.signature(grade).parameters
    assert list(parameters)[:1] == ["image"] and {"explain", "model", "name"} <= set(parameters)
    assert "Grading" in str(inspect.signature(grade).return_annotation)
    assert "checkpoints" in inspect.signature(load_model).parameters
    assert "Returns" in grade.__doc__ and "Raises" in grade.__doc__
    assert {"grade", "probabilities", "confidence", "warnings", "heatmap"} <= set(Grading.__dataclass_fields__)
    assert set(klgrade.__all__) <= set(dir(klgrade))


def test_help_shows_the_signature_of_grade():
    result = subprocess.run([sys.executable, "-c", "import klgrade; help(klgrade.grade)"], capture_output=True,
                            text=True, timeout=120, env={"PAGER": "cat", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "grade(image" in result.stdout and "explain: 'bool' = False" in result.stdout
    assert "-> 'Grading'" in result.stdout


def test_grading_starts_without_the_explanation_and_statistics_libraries():
    """captum (with matplotlib's pyplot) and scikit-learn (with scipy) cost ~2.5 s of every `klgrade predict`'s
    start-up on a 2-core machine: grading imports them only when it explains or scores."""
    code = ("import sys, klgrade.cli, klgrade.console, klgrade.infer.batch, klgrade.infer.grading, klgrade.serve.app; "
            "print(sorted({name.split('.')[0] for name in sys.modules} & {'captum', 'sklearn', 'scipy', 'kornia'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_every_default_written_in_an_options_help_is_shown_by_help():
    """Help texts name their defaults in brackets (`[auto]`, `[shipped model]`); rich markup would read those as
    style tags and drop them, so `klgrade train --help` said "auto, cpu or cuda ." instead of "[auto]"."""
    import re

    import typer

    from klgrade.cli import app

    from helpers import invoke_cli

    root = typer.main.get_command(app)
    commands = {(name,): command for name, command in root.commands.items()}
    commands.update({("data", name): command for name, command in root.commands["data"].commands.items()})
    checked = 0
    for words, command in commands.items():
        shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", invoke_cli(*words, "--help").stdout).split())
        for param in command.params:
            for default in re.findall(r"\[[^\]]*[a-z][^\]]*\]", getattr(param, "help", None) or ""):
                assert default in shown, (words, param.name, default)
                checked += 1
    assert checked >= 20, checked
