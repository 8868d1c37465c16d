"""Set-up files agree with each other, and the README's quick start runs as written."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(text):
    return sorted(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))


def test_environment_yml_lists_the_requirements():
    env = [line.strip()[2:].strip() for line in (ROOT / "environment.yml").read_text().splitlines() if re.match(r"\s+- \S+==", line)]
    assert sorted(env) == requirement_lines((ROOT / "requirements.txt").read_text())


def test_torch_is_pinned_and_pyproject_dependencies_are_covered():
    reqs = {line.split("==")[0].lower(): line for line in requirement_lines((ROOT / "requirements.txt").read_text())}
    assert reqs["torch"] == "torch==2.13.0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    for dep in declared:
        name = re.split(r"[<>=!~ \[]", dep)[0].lower()
        assert name in reqs, f"pyproject declares {name}, requirements.txt does not install it"


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in readme and "make demo" in readme


def test_readme_quick_start_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README quick start", "exec"), {})


# An import that needs a package outside the extras installed is blocked, as on a machine without it.
_BLOCKER = """
import importlib, importlib.abc, sys
ALLOWED = set(sys.argv[1].split(","))
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in {THIRD_PARTY} and top not in ALLOWED:
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
sys.meta_path.insert(0, Absent())
for module in sys.argv[2:]:
    importlib.import_module(module)
"""


def names(deps):
    """Distribution names of requirement strings: ``"numpy>=1.24"`` -> ``"numpy"``."""
    return {re.split(r"[<>=!~ \[]", d)[0].lower() for d in deps}


def _run_with(extras, script, *args):
    """Run ``script`` (with the blocker's ``{THIRD_PARTY}``) in a fresh interpreter where only torch and the
    pyproject ``extras`` are installed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    third_party = set().union(*map(names, optional.values())) - {"peft", "transformers"}
    allowed = names(project["dependencies"]).union(*(names(optional[e]) for e in extras))
    code = script.replace("{THIRD_PARTY}", repr(sorted(third_party)))
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code, ",".join(sorted(allowed)), *args],
                          capture_output=True, text=True, cwd=ROOT)


def _imports_with(extras, *modules):
    """Import ``modules`` where only torch and the pyproject ``extras`` are installed."""
    proc = _run_with(extras, _BLOCKER, *modules)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_equations_need_torch_alone():
    """``pip install lorax_ref`` (torch only) is enough for the equations and their registry."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert names(project["dependencies"]) == {"torch"}
    _imports_with((), "lorax_ref", "lorax_ref.core", "lorax_ref.linalg", "lorax_ref.related", "lorax_ref.registry")


def test_each_extra_is_enough_for_its_part():
    _imports_with(("conformance",), "lorax_ref.conformance", "lorax_ref.testing.strategies")
    _imports_with(("files",), "lorax_ref.predict")


def test_the_check_of_the_extras_can_fail():
    with pytest.raises(AssertionError, match="No module named 'hypothesis'"):
        _imports_with(("files",), "lorax_ref.testing.strategies")


_CLI = _BLOCKER.replace("for module in sys.argv[2:]:\n    importlib.import_module(module)\n",
                        "from lorax_ref.cli import main\nsys.exit(main(sys.argv[2:]))\n")


def _cli_with(extras, *argv):
    """``python -m lorax_ref *argv`` where only torch and the pyproject ``extras`` are installed."""
    return _run_with(extras, _CLI, *argv)


def test_the_command_line_names_the_extra_it_needs():
    """With torch alone: --help works and each command that needs an extra says which, in one line."""
    proc = _cli_with((), "--help")
    assert proc.returncode == 0 and "verify" in proc.stdout and "lorax_ref[conformance]" in proc.stdout, proc.stderr
    proc = _cli_with((), "verify", "x.py:f")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "lorax_ref: error: verify needs numpy: pip install 'lorax_ref[conformance]'"], proc.stderr
    proc = _cli_with((), "random-adapter", "--base", "minilm-l6", "--out", "never-written")
    assert proc.returncode == 1 and "pip install 'lorax_ref[files]'" in proc.stderr, proc.stderr
    assert not (ROOT / "never-written").exists()
    proc = _cli_with(("conformance",), "verify", "--list")
    assert proc.returncode == 0 and "eq3" in proc.stdout, proc.stderr[-2000:]
