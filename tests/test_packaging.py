"""Set-up files agree with each other, and the README's quick start runs as written."""
import re
import tomllib
from pathlib import Path

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
