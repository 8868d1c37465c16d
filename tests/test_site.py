"""The static site: rendered from the committed, executed notebooks (nothing is re-executed), offline, and
drawn without script errors in headless Chromium.

The expected figure counts come from the ``.ipynb`` files read with nbformat, not from the builder; the
offline check uses its own pattern, not the builder's. The browser tests skip when no Chromium binary is
installed (``apt-get install chromium``).
"""
from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pytest

import lorax_ref

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _load_script(name: str):
    """Import ``scripts/<name>.py`` (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"lorax_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


build_site = _load_script("build_site")
check_site = _load_script("check_site")
CHROMIUM = check_site.find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

# Anything that would make the browser fetch over the network: a src/href (on any element but a plain
# link <a>, which loads nothing until clicked) with a scheme-relative or http(s) URL, a JS import from
# one, or a CSS url()/@import of one.
NETWORK_REF = re.compile(
    r"""(?:<(?!a[\s>])[a-z][a-z0-9-]*\b[^>]*?\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//)"""
    r"""|(?:\bimport\b[^;\n]{0,200}?["'](?:https?:)?//)"""
    r"""|(?:(?:@import|url\()\s*["']?(?:https?:)?//)""",
    re.I,
)


def plotly_count(path: Path) -> int:
    nb = nbformat.read(path, as_version=4)
    return sum(
        PLOTLY_MIME in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


def has_math(path: Path) -> bool:
    nb = nbformat.read(path, as_version=4)
    return any(cell.cell_type == "markdown" and "$" in cell.source for cell in nb.cells)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not NOTEBOOKS:
        pytest.skip("no notebooks")
    out = tmp_path_factory.mktemp("site")
    pages = build_site.build(NOTEBOOKS, out)
    return out, pages


def test_one_page_per_notebook_and_a_local_plotly(site):
    out, pages = site
    assert {p.name for p in out.glob("*.html")} == {f"{nb.stem}.html" for nb in NOTEBOOKS} | {"index.html"}
    import plotly

    bundled = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert (out / "plotly.min.js").read_bytes() == bundled.read_bytes()
    for page in out.glob("*_*.html"):
        assert '<script src="plotly.min.js"></script>' in page.read_text(encoding="utf-8")


def test_pages_load_nothing_from_the_network(site):
    out, _ = site
    for page in out.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        hits = [text[m.start() : m.start() + 120] for m in NETWORK_REF.finditer(text)]
        assert not hits, f"{page.name} refers to the network: {hits[:3]}"
        assert not re.search(r"<script[^>]*(mathjax|require|mermaid)", text, re.I), page.name


@pytest.mark.parametrize(
    "snippet",
    [
        '<script src="https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/latest.js"></script>',
        "<link rel=stylesheet href=//cdn.example.org/x.css>",
        "<script type=module>import mermaid from 'https://cdn.example.org/m.mjs';</script>",
        "<style>@import url(https://fonts.example.org/f.css);</style>",
    ],
)
def test_the_offline_checks_catch_a_cdn(snippet):
    """Counter-test: both this file's pattern and the builder's guard see a planted CDN reference."""
    assert NETWORK_REF.search(snippet)
    assert build_site.external_urls(snippet)


def test_a_plain_hyperlink_is_not_a_network_load():
    snippet = '<p>See <a href="https://arxiv.org/abs/2501.16559">the paper</a>.</p>'
    assert not NETWORK_REF.search(snippet)
    assert not build_site.external_urls(snippet)


def test_every_plotly_output_becomes_a_figure_div(site):
    out, pages = site
    for nb_path in NOTEBOOKS:
        text = (out / f"{nb_path.stem}.html").read_text(encoding="utf-8")
        expected = plotly_count(nb_path)
        assert text.count('class="lorax-plotly"') == expected, nb_path.name
        assert text.count("Plotly.newPlot(") == expected, nb_path.name
        assert PLOTLY_MIME not in text


def test_math_is_rendered_as_mathml(site):
    pytest.importorskip("latex2mathml")
    out, _ = site
    for nb_path in NOTEBOOKS:
        if has_math(nb_path):
            text = (out / f"{nb_path.stem}.html").read_text(encoding="utf-8")
            assert "<math" in text, nb_path.name
            assert 'class="tex"' not in text, f"{nb_path.name}: some LaTeX could not be converted"


def test_index_has_the_equation_table(site):
    from lorax_ref.registry import KINDS, PROVENANCE

    out, _ = site
    index = (out / "index.html").read_text(encoding="utf-8")
    table = re.search(r'<table id="equations">(.*?)</table>', index, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]  # skip the header
    assert len(rows) == len(lorax_ref.EQUATIONS)
    tests_dir = ROOT / "tests"
    for row, (label, func) in zip(rows, lorax_ref.EQUATIONS.items()):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        assert html.unescape(cells[0]) == label
        assert f"{func.__module__}.{func.__name__}" in cells[1]
        # the source column: where the label comes from
        kind = PROVENANCE[label][0]
        assert kind in KINDS and cells[2].startswith(kind), (label, cells[2])
        # the test column: files that exist and mention the function
        files = re.findall(r"<code>tests/([^<]+)</code>", cells[3])
        assert files, f"{label}: no test file listed"
        for name in files:
            assert re.search(rf"\b{func.__name__}\b", (tests_dir / name).read_text(encoding="utf-8"))
        # the notebook column: every link lands on a heading that names the label
        links = re.findall(r'<a href="([^"#]+)#([^"]+)">', cells[4])
        assert links, f"{label}: no notebook section"
        for page, anchor in links:
            target = (out / page).read_text(encoding="utf-8")
            heading = re.search(rf'<h[1-6] id="{re.escape(html.escape(unquote(anchor), quote=True))}">(.*?)</h[1-6]>', target, re.S)
            assert heading, f"{label}: {page}#{unquote(anchor)} does not exist"
            assert label in html.unescape(re.sub(r"<math\b.*?</math>|<[^>]+>", "", heading.group(1))), (label, page)


def test_index_shows_the_readme_notation_and_provenance(site):
    """The notebooks link to index.html#notation and #provenance: both sections exist and carry every row of
    the README's tables (read here with a plain line count, not with the builder's parser)."""
    out, _ = site
    index = (out / "index.html").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("notation", "provenance"):
        section = re.search(rf'<section id="{name}">(.*?)</section>', index, re.S)
        assert section, f"index.html has no #{name}"
        block = readme.split(f"<!-- site:{name}:start -->")[1].split(f"<!-- site:{name}:end -->")[0]
        rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("|---")]
        assert len(rows) > 5
        assert section.group(1).count("<tr>") == len(rows), name  # header + body rows
        first_cells = [html.escape(row.split("|")[1].strip(), quote=False) for row in rows[1:]]
        for cell in first_cells:
            assert cell in section.group(1), (name, cell)


def test_notebook_math_has_no_underbrace():
    """Chromium's MathML draws \\underbrace as a tiny unstretched glyph: write such formulas without it."""
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                assert "\\underbrace" not in cell.source and "\\overbrace" not in cell.source, nb_path.name


def test_execute_reports_each_notebook_and_talks_to_the_kernel_over_ipc(tmp_path):
    """`make demo` prints one line per executed notebook (name, seconds), and its kernels do not warn about TCP."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("print(6 * 7)"))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "99_tiny.ipynb"
    nbformat.write(nb, path)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_site.py"), "--execute", "--out",
                           str(tmp_path / "site"), str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\[1/1\] 99_tiny\.ipynb \d+ s$", done.stdout, re.M), done.stdout
    assert "TCP" not in done.stderr + done.stdout
    assert "WARNING" not in done.stderr, done.stderr  # e.g. a kernel left running until this process exits
    assert "42" in (tmp_path / "site" / "99_tiny.html").read_text(encoding="utf-8")
    assert nbformat.read(path, as_version=4).cells[0].outputs == []  # executed in memory only


def test_the_builder_fails_on_a_notebook_that_would_load_a_cdn(tmp_path):
    """Counter-test for the build-time guard: a notebook whose output loads a CDN script is refused."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("display_data", data={"text/html": '<script src="https://cdn.example.org/x.js"></script>'})
    ]))
    path = tmp_path / "99_bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(RuntimeError, match="network"):
        build_site.build([path], tmp_path / "site")


# ---------------------------------------------------------------------------------------- browser


@pytest.mark.browser
@needs_chromium
def test_every_page_loads_without_errors_and_draws_its_figures(site, tmp_path):
    out, _ = site
    expected = {f"{p.stem}.html": plotly_count(p) for p in NOTEBOOKS} | {"index.html": 0}
    with check_site.Chromium(CHROMIUM) as browser:
        for name, figures in expected.items():
            res = browser.check(out / name)
            assert not res.errors, f"{name}: {res.errors}"
            assert not res.requests, f"{name} made network requests: {res.requests}"
            assert res.figures == figures, name
            assert res.drawn == figures, f"{name}: {res.drawn} of {figures} figures drawn"
            assert res.main_svg >= figures  # plotly draws at least one svg.main-svg per figure
            if name != "index.html":
                assert res.plotly, f"{name}: plotly.js did not load"
            if name != "index.html" and has_math(ROOT / "notebooks" / name.replace(".html", ".ipynb")):
                assert res.math > 0 and res.math_shown == res.math, f"{name}: math not rendered"
        shot = tmp_path / "page.png"
        browser.screenshot(out / f"{NOTEBOOKS[0].stem}.html", shot)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.browser
@needs_chromium
def test_the_browser_check_sees_errors_requests_and_undrawn_figures(tmp_path):
    """Counter-test: a broken page is reported as broken."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><div class="lorax-plotly"></div>'
        '<img src="http://127.0.0.1:9/nothing.png">'
        '<script>throw new Error("boom")</script></body></html>',
        encoding="utf-8",
    )
    with check_site.Chromium(CHROMIUM) as browser:
        res = browser.check(bad, settle=1.0)
    assert any("boom" in e for e in res.errors)
    assert any(u.startswith("http://127.0.0.1:9/") for u in res.requests)
    assert res.figures == 1 and res.drawn == 0 and not res.ok
