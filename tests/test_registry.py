"""The registry keeps "one function per equation" true mechanically."""
import inspect
import re
from pathlib import Path

import pytest

from lorax_ref import EQUATIONS
from lorax_ref.registry import lookup, slug
from lorax_ref.errors import LoraxInputError

ROOT = Path(__file__).resolve().parents[1]
TESTS = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_registry.py"}


@pytest.mark.parametrize("label", list(EQUATIONS))
def test_label_in_docstring(label):
    doc = inspect.getdoc(EQUATIONS[label]) or ""
    assert label in doc.splitlines()[0], f"{label!r} missing from the first line of the docstring"
    assert ":math:" in doc or ".. math::" in doc, f"{label!r}: the docstring states no equation"


@pytest.mark.parametrize("label", list(EQUATIONS))
def test_every_equation_has_a_test(label):
    name = EQUATIONS[label].__name__
    users = [f for f, text in TESTS.items() if re.search(rf"\b{name}\(", text)]
    assert users, f"no test calls {name} ({label})"


@pytest.mark.parametrize("label", list(EQUATIONS))
def test_every_equation_is_called_in_the_equation_tests(label):
    """Notebook 05's audit ("verified by unit tests") relies on this: the property tests of the equations
    call every function of the registry."""
    name = EQUATIONS[label].__name__
    assert re.search(rf"\b{name}\(", TESTS["test_equations.py"]), f"tests/test_equations.py never calls {name} ({label})"


def test_labels_and_slugs_are_unique_and_resolvable():
    slugs = [slug(label) for label in EQUATIONS]
    assert len(set(slugs)) == len(slugs)
    for label, func in EQUATIONS.items():
        assert lookup(label) == (label, func) == lookup(slug(label)) == lookup(func.__name__)
    with pytest.raises(LoraxInputError, match="unknown equation 'eq9'; known: eq1 \\(Eq. \\(1\\)\\)"):
        lookup("eq9")


def test_readme_equation_table_is_in_step():
    """Every label appears in the README table with its function, and the table has no stale rows."""
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "`lorax_ref." in line]
    for label, func in EQUATIONS.items():
        assert any(f"| {label} |" in row and f"`lorax_ref.{func.__name__}`" in row for row in rows), label
    assert len(rows) == len(EQUATIONS), "the README equation table has rows for labels not in the registry"


def test_every_label_says_where_it_comes_from_and_the_readme_agrees():
    """PROVENANCE covers the registry exactly, with known kinds; the README table's source column matches."""
    from lorax_ref.registry import KINDS, PROVENANCE

    assert list(PROVENANCE) == list(EQUATIONS)
    assert all(kind in KINDS and note for kind, note in PROVENANCE.values())
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "`lorax_ref." in line]
    for label, (kind, _) in PROVENANCE.items():
        row = next(r for r in rows if f"| {label} |" in r)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == kind, (label, cells)


def _product_texts():
    """Code, tests, scripts, notebooks and README: everything a user's clone holds."""
    for folder, pattern in (("lorax_ref", "**/*.py"), ("tests", "*.py"), ("scripts", "*.py"), ("notebooks", "*.ipynb")):
        for path in sorted((ROOT / folder).glob(pattern)):
            yield path.relative_to(ROOT), path.read_text()
    yield Path("README.md"), (ROOT / "README.md").read_text()


def test_identity_citations_resolve():
    """Every ``docs/identities.md §N`` cited in the repository is a section of that file, and each section is cited."""
    sections = set(re.findall(r"^## §(\d+) ", (ROOT / "docs" / "identities.md").read_text(), re.M))
    cited = {}
    for path, text in _product_texts():
        for number in re.findall(r"docs/identities\.md §(\d+)", text):
            cited.setdefault(number, path)
    missing = {n: str(p) for n, p in cited.items() if n not in sections}
    assert not missing, f"citations of sections that docs/identities.md does not have: {missing}"
    uncited = sorted(sections - set(cited), key=int)
    assert not uncited, f"sections no test cites: {uncited}"


def test_citations_point_inside_the_repository():
    """No citation of notes that a clone of the repository does not contain."""
    outside = re.compile(r"lorax-math[.]md|shared[/]reference|docs[/]README")  # brackets: not a hit on this line
    hits = [f"{path}: {m.group(0)}" for path, text in _product_texts() for m in outside.finditer(text)]
    assert not hits, hits
