"""The notebooks and the equation registry stay in step: every label of ``lorax_ref.EQUATIONS`` is the
subject of a markdown heading in at least one notebook, the notebooks only import the functions (they
never redefine one), and they are committed executed.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

import lorax_ref

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def headings(path: Path) -> list[str]:
    """Markdown headings of a notebook (code fences skipped)."""
    nb = nbformat.read(path, as_version=4)
    out = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            out += HEADING.findall(FENCE.sub("", cell.source))
    return out


def names_label(text: str, label: str) -> bool:
    """``text`` contains ``label`` somewhere that is not just the start of a longer label.

    "Eq. (3) rotation form: ..." names "Eq. (3) rotation form" but not "Eq. (3)".
    """
    longer = [other for other in lorax_ref.EQUATIONS if other != label and other.startswith(label)]
    return any(
        not any(text[m.start() :].startswith(other) for other in longer)
        for m in re.finditer(re.escape(label), text)
    )


@pytest.fixture(scope="module")
def all_headings():
    if not NOTEBOOKS:
        pytest.skip("no notebooks yet")
    return {path.name: headings(path) for path in NOTEBOOKS}


@pytest.mark.parametrize("label", list(lorax_ref.EQUATIONS))
def test_every_label_heads_a_notebook_section(label, all_headings):
    where = [f"{nb}: {h}" for nb, hs in all_headings.items() for h in hs if names_label(h, label)]
    assert where, f"no notebook has a markdown heading naming {label!r}"


def test_names_label_tells_a_label_from_a_longer_one():
    assert names_label("2 · Eq. (3) rotation form: rotate and shrink", "Eq. (3) rotation form")
    assert not names_label("2 · Eq. (3) rotation form: rotate and shrink", "Eq. (3)")
    assert names_label("4 · §4.2.2 against Eq. (3) at equal sizes", "Eq. (3)")
    assert not names_label("1 · §4.2.2 alignment maps: deriving P", "§4.2.2")
    assert names_label("Eq. (3) low-rank form, then Eq. (3) again", "Eq. (3)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_the_equations_instead_of_redefining_them(path):
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    for func in lorax_ref.EQUATIONS.values():
        assert not re.search(rf"^\s*def\s+{func.__name__}\b", code, re.M), f"{path.name} redefines {func.__name__}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed(path):
    """Strict nbval compares stored outputs: a notebook saved without them would pass vacuously."""
    nb = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]
    assert code_cells, f"{path.name} has no code"
    assert all(cell.get("execution_count") for cell in code_cells), f"{path.name} has unexecuted cells"
    assert any(cell.get("outputs") for cell in code_cells), f"{path.name} has no stored output"
    errors = [out for cell in code_cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name} was saved with an error output"
