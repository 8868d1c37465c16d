"""Stored notebook outputs are portable: the other-numerics check works, and the rules it relies on hold.

* :mod:`lorax_ref.testing.perturb` perturbs every decomposition, by the right amount, deterministically;
* ``notebooks/conftest.py`` gives nbval's kernels those numerics (and an empty cache), and a notebook that
  prints a digit the perturbation moves fails strict nbval — checked on a throw-away notebook;
* :func:`lorax_ref.experiments.plotting.shown` / :func:`~lorax_ref.experiments.plotting.decade` refuse digits near a boundary;
* a cell whose output nbval does not compare says why, and only figures and timings may do so.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from lorax_ref.experiments.plotting import UnstableDigits, decade, shown

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"
IGNORE = "# NBVAL_IGNORE_OUTPUT"
REASONS = ("figure", "timing")


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (the perturbation is process-wide) and return its stdout."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


# --------------------------------------------------------------------------------------------------------
# The perturbation
# --------------------------------------------------------------------------------------------------------


def test_perturbation_moves_every_decomposition_by_a_few_ulps_and_is_deterministic():
    out = _python("""
        import json, numpy as np, scipy.linalg as sla, torch
        A = np.random.default_rng(0).standard_normal((7, 5))
        ref = {"np": np.linalg.svd(A, compute_uv=False), "sp": sla.svdvals(A),
               "t64": torch.linalg.svdvals(torch.from_numpy(A)).numpy(),
               "t32": torch.linalg.svdvals(torch.from_numpy(A).float()).double().numpy()}
        from lorax_ref.testing import perturb
        p = perturb.install(1e-15, 1)
        perturb.install(1e-15, 1)  # a second install does not wrap twice
        new = {"np": np.linalg.svd(A, compute_uv=False), "sp": sla.svdvals(A),
               "t64": torch.linalg.svdvals(torch.from_numpy(A)).numpy(),
               "t32": torch.linalg.svdvals(torch.from_numpy(A).float()).double().numpy()}
        again = np.linalg.svd(A, compute_uv=False)
        ints = np.linalg.qr(np.eye(3, dtype=int))[0]  # non-float input passes through
        print(json.dumps({k: float(np.max(np.abs(new[k] - ref[k]) / ref[k])) for k in ref}
                         | {"same_again": bool(np.array_equal(again, new["np"])), "calls": next(p.calls),
                            "wrapped": getattr(torch.linalg.svd, "_lorax_perturbed", False)}))
    """)
    r = json.loads(out)
    for key in ("np", "sp", "t64"):
        assert 1e-16 < r[key] < 1e-13, (key, r[key])  # moved, by a few float64 ulps
    assert 1e-8 < r["t32"] < 1e-5  # float32 inputs move at float32's epsilon
    assert r["same_again"] and r["wrapped"]
    assert r["calls"] >= 5  # every float call went through the perturbation, the integer one too


def test_perturbation_switch_reads_the_environment():
    from lorax_ref.testing import perturb

    assert perturb.parse("1e-15:3") == (1e-15, 3) and perturb.parse("2e-16") == (2e-16, 0)
    assert perturb.install_from_env({}) is None  # unset: nothing installed
    out = _python("""
        import torch
        from lorax_ref.testing import perturb
        perturb.install_from_env({"LORAX_PERTURB": "1e-15:2"})
        print(torch.linalg.eigh._lorax_perturbed, torch.linalg.qr._lorax_perturbed)
    """)
    assert out.split() == ["True", "True"]


# --------------------------------------------------------------------------------------------------------
# The check itself, on throw-away notebooks
# --------------------------------------------------------------------------------------------------------


def _notebook(path: Path, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _execute_natively(path: Path) -> None:
    env = {**os.environ, "LORAX_NBVAL_NUMERICS": "native"}  # as `make notebooks` records them
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                    str(path)], check=True, capture_output=True, cwd=path.parent, env=env)


def _nbval(folder: Path, numerics: str = "other1") -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAX_NBVAL_NUMERICS": numerics}
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
                           "-q", "-rf", str(folder)], capture_output=True, text=True, cwd=folder, env=env)


def _checked_folder(tmp_path: Path) -> Path:
    """A folder with the repository's notebook conftest: nbval there runs under the other numerics."""
    folder = tmp_path / "nb"
    folder.mkdir()
    shutil.copy(ROOT / "notebooks" / "conftest.py", folder / "conftest.py")
    return folder


ENV_CELL = """\
import os, torch, numpy, scipy.linalg
if os.environ.get("LORAX_NBVAL_NUMERICS", "native") != "native":  # nbval's kernel, not the recording one
    assert torch.linalg.svd._lorax_perturbed and numpy.linalg.eigh._lorax_perturbed and scipy.linalg.svd._lorax_perturbed
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default" and os.environ["OMP_NUM_THREADS"] == "1"
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    assert os.environ["LORAX_PERTURB"].startswith("1e-15") and os.listdir(os.environ["LORAX_CACHE_DIR"]) == []"""
SETUP = "import numpy as np\ns = np.linalg.svd(np.random.default_rng(0).standard_normal((30, 20)), compute_uv=False)"


def test_the_check_flags_a_digit_another_machine_would_print_differently(tmp_path):
    """Recorded natively: 17 significant digits of a singular value (cell 2) and 6 digits (cell 3). Under each
    set of other numerics the kernel is set up as documented (cell 0 asserts it), cell 2 fails and nothing
    else does; with the machine's own numerics everything passes."""
    folder = _checked_folder(tmp_path)
    _notebook(folder / "fragile.ipynb", [ENV_CELL, SETUP, 'print(f"{s[-1]:.17g}")', 'print(f"{s[-1]:.6g}")'])
    _execute_natively(folder / "fragile.ipynb")
    for numerics in ("other1", "other2"):
        run = _nbval(folder, numerics)
        failed = re.findall(r"FAILED \S+::Cell (\d+)", run.stdout)
        assert run.returncode == 1 and failed == ["2"], (numerics, run.stdout[-3000:])
    assert _nbval(folder, "native").returncode == 0  # the machine that recorded it agrees with itself


# --------------------------------------------------------------------------------------------------------
# Stable printing
# --------------------------------------------------------------------------------------------------------


def test_shown_prints_stable_digits_and_refuses_the_others():
    assert shown(0.55213, ".3f") == "0.552"
    assert shown(-1234.5678, ".1f") == "-1234.6"
    with pytest.raises(UnstableDigits, match="fewer digits"):
        shown(0.2225000001, ".3f", rel=1e-6)  # a relative 1e-6 change crosses 0.2225
    assert shown(0.2225000001, ".2f", rel=1e-6) == "0.22"


def test_decade_is_the_power_of_ten_above_and_refuses_one_that_sits_on_it():
    assert decade(2.2498e-6) == "1e-05" and decade(7.37e-11) == "1e-10" and decade(0.99609) == "1e+00"
    with pytest.raises(UnstableDigits):
        decade(0.99999)
    with pytest.raises(UnstableDigits):
        decade(1.00001e-3)
    with pytest.raises(ValueError):
        decade(0.0)


# --------------------------------------------------------------------------------------------------------
# Cells whose output is not compared
# --------------------------------------------------------------------------------------------------------


def _ignored_cells():
    for path in NOTEBOOKS:
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        for i, cell in enumerate(code):
            if IGNORE in cell.source:
                yield pytest.param(path, code, i, id=f"{path.stem}-cell{i}")


@pytest.mark.parametrize("path, code, i", list(_ignored_cells()))
def test_a_cell_whose_output_is_not_compared_is_a_figure_or_a_timing(path, code, i):
    """The one rule: after ``# NBVAL_IGNORE_OUTPUT`` a comment ``# figure: …`` or ``# timing: …`` says why.
    A figure cell shows plotly figures only, and its data is asserted in it or in the cell before; a timing
    cell asserts nothing (it prints wall times and machine details, never a claim)."""
    lines = code[i].source.splitlines()
    reason = re.match(r"#\s*(\w+):", lines[lines.index(IGNORE) + 1]) if IGNORE in lines[:-1] else None
    assert reason and reason.group(1) in REASONS, f"{path.name} cell {i}: say why the output is not compared"
    outputs = code[i].get("outputs", [])
    if reason.group(1) == "figure":
        assert outputs and all(set(o.get("data", {})) == {PLOTLY} for o in outputs), \
            f"{path.name} cell {i}: a figure cell shows nothing but figures"
        assert "assert" in code[i].source or (i > 0 and "assert" in code[i - 1].source), \
            f"{path.name} cell {i}: the figure's data is asserted in this cell or the one before"
    else:
        assert not re.search(r"^\s*assert\b", code[i].source, re.M), f"{path.name} cell {i}: a timing cell asserts nothing"
