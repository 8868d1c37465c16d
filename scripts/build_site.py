#!/usr/bin/env python
"""Render the notebooks into a small static site that works offline.

    python scripts/build_site.py                  # render the committed (executed) notebooks into site/
    python scripts/build_site.py --execute        # execute each notebook in memory first (nothing is written back)
    python scripts/build_site.py --out /tmp/site notebooks/01_lorax_adapter.ipynb

What it produces, in ``--out`` (default ``site/``):

* one ``NN_name.html`` per notebook, rendered with nbconvert's ``lab`` template;
* ``index.html`` with the equation table generated from :data:`lorax_ref.EQUATIONS` — label, function
  (name and first docstring line), its provenance (:data:`lorax_ref.registry.PROVENANCE`), the test files
  that mention the function, and links to every notebook section whose heading names the label — followed
  by the README's *Notation* and *Provenance* sections (``#notation``, ``#provenance``: the notebooks link
  there), rendered from the README itself so that the two never disagree;
* ``plotly.min.js``, copied from the installed ``plotly`` package.

Offline by construction: no page loads anything from the network.

* Plotly figures are stored in the notebooks as ``application/vnd.plotly.v1+json`` (see
  :func:`lorax_ref.experiments.plotting.init_notebook`); each becomes a ``<div>`` plus a ``Plotly.newPlot`` call that
  uses the local ``plotly.min.js``.
* nbconvert's template loads require.js, MathJax and mermaid from a CDN. Those blocks are replaced.
  Math is converted at build time to MathML with ``latex2mathml`` (pure Python), which browsers render
  natively (Chromium ≥ 109, Firefox, Safari) — no script, no fonts to ship. Without ``latex2mathml``
  installed, or for a formula it cannot parse, the LaTeX source is left readable in a
  ``<code class="tex">`` element and a warning names it.
* After rendering, every page is scanned for ``src``/``href``/``import`` URLs with a network scheme; the
  build fails if it finds one (:func:`external_urls`).

Nothing is executed unless ``--execute`` is given (``make demo``). Then each notebook runs in memory, in a
kernel that talks to this process over local IPC sockets in a temporary folder (no TCP port, no
"running over TCP without encryption" warning), and one line per notebook says how long it took.
"""
from __future__ import annotations

import argparse
import copy
import html
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import jinja2
import nbformat
from nbconvert.exporters import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

ROOT = Path(__file__).resolve().parent.parent
PLOTLY_MIME = "application/vnd.plotly.v1+json"
FIGURE_CLASS = "lorax-plotly"

try:  # optional: without it math stays readable LaTeX
    from latex2mathml.converter import convert as _latex2mathml
except ImportError:  # pragma: no cover - depends on the environment
    _latex2mathml = None


# ------------------------------------------------------------------------------------------------
# Math: LaTeX -> MathML at build time
# ------------------------------------------------------------------------------------------------


def math_html(tex: str, display: bool) -> str:
    """MathML for ``tex`` (``display`` for ``$$…$$``), or the escaped source if it cannot be converted."""
    tex = tex.strip()
    if _latex2mathml is not None:
        try:
            mathml = _latex2mathml(tex, display="block" if display else "inline")
            # keep the source for copy/paste and screen readers; drop the namespace URL (HTML needs none)
            return mathml.replace(
                ' xmlns="http://www.w3.org/1998/Math/MathML"', f' alttext="{html.escape(tex, quote=True)}"', 1
            )
        except Exception as exc:  # noqa: BLE001 - any parser failure falls back to the source
            warnings.warn(f"latex2mathml could not convert {tex!r} ({exc}); left as LaTeX source", stacklevel=2)
    code = f'<code class="tex">{html.escape(tex)}</code>'
    return f'<div class="tex-display">{code}</div>' if display else code


class SiteRenderer(IPythonRenderer):
    """nbconvert's markdown renderer with MathML math and heading ids that survive MathML."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ids: dict[str, int] = {}

    def block_math(self, body: str) -> str:
        return math_html(body, display=True)

    def inline_math(self, body: str) -> str:
        return math_html(body, display=False)

    def latex_environment(self, name: str, body: str) -> str:
        return math_html(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)

    def heading(self, text: str, level: int, **attrs) -> str:
        # nbconvert's add_anchor round-trips the heading through ElementTree, which renames MathML
        # elements to ``ns0:math`` (then shown as plain text); build the id and the link here instead.
        plain = html.unescape(re.sub(r"<[^>]+>", "", text)).strip()
        anchor = re.sub(r"\s+", "-", plain) or f"section-{level}"
        count = self.ids.get(anchor, 0)
        self.ids[anchor] = count + 1
        if count:
            anchor = f"{anchor}-{count + 1}"
        attr = html.escape(anchor, quote=True)
        return f'<h{level} id="{attr}">{text}<a class="anchor-link" href="#{attr}">¶</a></h{level}>\n'


# ------------------------------------------------------------------------------------------------
# Template: nbconvert's lab template without any CDN script, plus plotly.js and a navigation bar
# ------------------------------------------------------------------------------------------------

SITE_CSS = """
nav.lorax-nav { font: 14px/1.4 system-ui, sans-serif; padding: 8px 16px; border-bottom: 1px solid #ddd;
  background: #fafafa; position: sticky; top: 0; z-index: 10; }
nav.lorax-nav a { margin-right: 1.2em; text-decoration: none; }
code.tex { white-space: pre-wrap; }
sup { font-size: 70%; color: #555; }
div.tex-display { text-align: center; margin: 0.6em 0; }
math[display="block"] { margin: 0.6em 0; }
.lorax-plotly { margin: 4px 0; }
"""

TEMPLATE = (
    "{%- extends 'index.html.j2' -%}\n"
    "{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}\n"
    "{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}\n"
    "{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}\n"
    "{% block jupyter_widgets %}{% endblock jupyter_widgets %}\n"
    "{%- block html_head_css -%}\n"
    '<script src="plotly.min.js"></script>\n'
    "<style>{{ resources.site_css }}</style>\n"
    "{%- endblock html_head_css -%}\n"
    "{%- block body_header -%}\n"
    "{{ super() }}\n"
    "{{ resources.site_nav }}\n"
    "{%- endblock body_header -%}\n"
)


class SiteExporter(HTMLExporter):
    """HTMLExporter with the site template and renderer (no network, MathML math)."""

    def __init__(self, **kwargs):
        loader = jinja2.DictLoader({"lorax_site.html.j2": TEMPLATE})
        super().__init__(extra_loaders=[loader], template_name="lab", **kwargs)
        self.template_file = "lorax_site.html.j2"

    def default_filters(self):
        # ``clean_html`` (bleach) runs on every highlighted code input even when sanitising is off; that
        # input is pygments output, escaped by construction, and this site renders only the repository's own
        # notebooks. Skipping it halves the build time.
        for name, func in super().default_filters():
            yield (name, (lambda html_text: html_text) if name == "clean_html" else func)

    @jinja2.pass_context
    def markdown2html(self, context, source):
        cell = context.get("cell", {})
        path = context.get("resources", {}).get("metadata", {}).get("path", "")
        renderer = SiteRenderer(
            escape=False,
            attachments=cell.get("attachments", {}),
            embed_images=self.embed_images,
            path=path,
            anchor_link_text=self.anchor_link_text,
            exclude_anchor_links=self.exclude_anchor_links,
        )
        # one renderer per page keeps heading ids unique across cells
        if self._page_ids is not None:
            renderer.ids = self._page_ids
        return MarkdownWithMath(renderer=renderer).render(source)

    _page_ids: dict | None = None

    def render_page(self, nb, nav: str) -> str:
        self._page_ids = {}
        try:
            body, _ = self.from_notebook_node(nb, resources={"site_css": SITE_CSS, "site_nav": nav})
        finally:
            self._page_ids = None
        return body


# ------------------------------------------------------------------------------------------------
# Plotly outputs -> div + Plotly.newPlot
# ------------------------------------------------------------------------------------------------


def _script_json(obj) -> str:
    """JSON that is safe inside a <script> element."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def plotly_outputs(nb) -> list:
    """The outputs of ``nb`` that carry a plotly figure, in order."""
    return [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if PLOTLY_MIME in out.get("data", {})
    ]


def inline_figures(nb, stem: str) -> int:
    """Replace each plotly JSON output of ``nb`` (in place) by HTML that draws it; returns the count."""
    outputs = plotly_outputs(nb)
    for i, out in enumerate(outputs):
        fig = out["data"][PLOTLY_MIME]
        div_id = f"fig-{stem}-{i + 1}"
        config = {"responsive": True, "displaylogo": False, **fig.get("config", {})}
        out["data"] = {
            "text/html": (
                f'<div id="{div_id}" class="{FIGURE_CLASS}"></div>\n'
                "<script>\n"
                f"Plotly.newPlot(document.getElementById({json.dumps(div_id)}), "
                f"{_script_json(fig.get('data', []))}, {_script_json(fig.get('layout', {}))}, {_script_json(config)});\n"
                "</script>"
            )
        }
        out.setdefault("metadata", {})
    return len(outputs)


# ------------------------------------------------------------------------------------------------
# Offline check
# ------------------------------------------------------------------------------------------------

_URL_ATTR = re.compile(r"""<(script|link|img|iframe|source|audio|video)\b[^>]*?\b(src|href)\s*=\s*["']?\s*([a-z][a-z0-9+.-]*:)?//""", re.I)
_IMPORT = re.compile(r"""\b(import|from)\s*\(?\s*["'](https?:)?//""", re.I)
_CSS_URL = re.compile(r"""(@import|url\()\s*["']?(https?:)?//""", re.I)


def external_urls(page: str) -> list[str]:
    """Snippets of ``page`` that would load something over the network (scripts, styles, imports, images)."""
    found = []
    for regex in (_URL_ATTR, _IMPORT, _CSS_URL):
        for match in regex.finditer(page):
            found.append(page[match.start() : match.start() + 160])
    return found


# ------------------------------------------------------------------------------------------------
# Index page: the equation table
# ------------------------------------------------------------------------------------------------


@dataclass
class Page:
    stem: str
    title: str
    headings: list[tuple[str, str, str]] = field(default_factory=list)  # (id, plain text, inner HTML)
    figures: int = 0


_HEADING = re.compile(r'<h([1-6]) id="([^"]*)">(.*?)<a class="anchor-link"', re.S)


def page_headings(page: str) -> list[tuple[str, str, str]]:
    """``(id, plain text, inner HTML)`` of every markdown heading of a rendered page (math as its LaTeX in the text)."""
    out = []
    for match in _HEADING.finditer(page):
        inner = match.group(3).strip()
        text = re.sub(r"<math\b.*?</math>", lambda m: _math_text(m.group(0)), inner, flags=re.S)
        text = html.unescape(re.sub(r"<[^>]+>", "", text)).strip()
        out.append((html.unescape(match.group(2)), text, inner))
    return out


def _math_text(mathml: str) -> str:
    alt = re.search(r'alttext="([^"]*)"', mathml)
    return html.unescape(alt.group(1)) if alt else re.sub(r"<[^>]+>", "", mathml)


def label_in(text: str, label: str, labels) -> bool:
    """Does ``text`` name ``label`` itself, not only a longer label that starts with it?

    "Eq. (3) rotation form" names "Eq. (3) rotation form", not "Eq. (3)".
    """
    longer = [other for other in labels if other != label and other.startswith(label)]
    start = text.find(label)
    while start >= 0:
        if not any(text.startswith(other, start) for other in longer):
            return True
        start = text.find(label, start + 1)
    return False


def rst_inline(text: str) -> str:
    """HTML for one line of a docstring: ``code`` and :math:`tex` roles rendered, everything else escaped."""
    parts = re.split(r"(``[^`]+``|:math:`[^`]+`)", text)
    out = []
    for part in parts:
        if part.startswith("``"):
            out.append(f"<code>{html.escape(part[2:-2])}</code>")
        elif part.startswith(":math:`"):
            out.append(math_html(part[7:-1], display=False))
        else:
            out.append(html.escape(part))
    return "".join(out)


def covering_tests(func_name: str, tests_dir: Path) -> list[str]:
    """Test files that mention ``func_name`` as a word."""
    pattern = re.compile(rf"\b{re.escape(func_name)}\b")
    return sorted(p.name for p in tests_dir.glob("test_*.py") if pattern.search(p.read_text(encoding="utf-8")))


README_SECTIONS = ("notation", "provenance")  # <!-- site:NAME:start --> … <!-- site:NAME:end --> in README.md


def readme_section(readme: str, name: str) -> str:
    """The markdown between ``<!-- site:NAME:start -->`` and ``<!-- site:NAME:end -->`` in the README."""
    match = re.search(rf"<!-- site:{name}:start -->\n(.*?)<!-- site:{name}:end -->", readme, re.S)
    if not match:
        raise ValueError(f"README.md has no '<!-- site:{name}:start -->' … '<!-- site:{name}:end -->' section")
    return match.group(1)


def markdown_html(text: str) -> str:
    """HTML for a markdown text, with the notebooks' renderer (MathML math, heading ids)."""
    return MarkdownWithMath(renderer=SiteRenderer(escape=False, anchor_link_text="¶")).render(text)


def index_html(pages: list[Page], tests_dir: Path, readme: Path | None = None) -> str:
    from lorax_ref import EQUATIONS
    from lorax_ref.registry import PROVENANCE

    readme_text = (readme or ROOT / "README.md").read_text(encoding="utf-8")
    sections = "\n".join(
        f'<section id="{name}">\n{markdown_html(readme_section(readme_text, name))}</section>' for name in README_SECTIONS
    )
    labels = list(EQUATIONS)
    rows = []
    for label, func in EQUATIONS.items():
        doc = (func.__doc__ or "").strip().splitlines()
        first = doc[0].strip() if doc else ""
        tests = covering_tests(func.__name__, tests_dir)
        links = [
            f'<a href="{p.stem}.html#{quote(hid, safe="")}">{html.escape(p.stem[:2])} · {inner}</a>'
            for p in pages
            for hid, text, inner in p.headings
            if label_in(text, label, labels)
        ]
        rows.append(
            "<tr>"
            f"<td>{html.escape(label)}</td>"
            f"<td><code>{html.escape(func.__module__)}.{html.escape(func.__name__)}</code><br>{rst_inline(first)}</td>"
            f"<td>{html.escape(PROVENANCE[label][0])}<br><span class=\"muted\">{html.escape(PROVENANCE[label][1])}</span></td>"
            f"<td>{'<br>'.join(f'<code>tests/{html.escape(t)}</code>' for t in tests) or '<em>none found</em>'}</td>"
            f"<td>{'<br>'.join(links) or '<em>none</em>'}</td>"
            "</tr>"
        )
    notebooks = "\n".join(
        f'<li><a href="{p.stem}.html">{html.escape(p.title)}</a> <span class="muted">({p.figures} figures)</span></li>'
        for p in pages
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>lorax_ref — LoRA-X, derived and verified</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 6px 8px; vertical-align: top; text-align: left; }}
th {{ background: #f3f3f3; }}
code {{ font-size: 13px; }}
.muted {{ color: #777; }}
</style>
</head>
<body>
<h1>lorax_ref — LoRA-X, derived and verified</h1>
<p>An executable reference of LoRA-X (Farhadzadeh et al., ICLR 2025): training-free transfer of a LoRA-style
adapter between base models through their singular subspaces. Each notebook below derives part of the method
and checks every claim against an independent numpy/scipy computation; the pages are the executed notebooks.</p>
<h2>Notebooks</h2>
<ol class="notebooks">
{notebooks}
</ol>
<p>What is the paper's, what is derived or measured here, and what is our convention:
<a href="#provenance">Provenance</a>. Symbols: <a href="#notation">Notation</a>.</p>
<h2>Equations</h2>
<p>Generated from <code>lorax_ref.EQUATIONS</code>: one function per label, where the label comes from
(<code>lorax_ref.registry.PROVENANCE</code>), the test files that exercise it, and the notebook sections that
demonstrate it.</p>
<table id="equations">
<thead><tr><th>label</th><th>function</th><th>source</th><th>test</th><th>notebook section</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
{sections}
</body>
</html>
"""


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------


def notebook_title(nb, stem: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if match:
                return match.group(1).strip()
    return stem


def execute(nb, cwd: Path, timeout: int) -> None:
    """Run ``nb`` in place in a fresh kernel connected over IPC sockets in a private temporary folder."""
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory(prefix="lorax-kernel-") as tmp:
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(tmp) / "kernel"))
        try:
            NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(cwd)}}).execute()
        finally:  # a client given its kernel manager leaves the kernel running: stop it before the next one
            if km.has_kernel:
                km.shutdown_kernel(now=True)


def plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in the installed plotly package ({path})")
    return path


def build(notebooks: list[Path], out: Path, do_execute: bool = False, timeout: int = 600, tests_dir: Path | None = None,
          log=None) -> list[Page]:
    """Render ``notebooks`` into ``out``; returns what each page contains. ``log(line)`` reports progress."""
    if not notebooks:
        raise SystemExit("no notebooks to render")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plotly_js(), out / "plotly.min.js")
    exporter = SiteExporter()
    notebooks = sorted(notebooks)
    stems = [p.stem for p in notebooks]
    pages = []
    for i, path in enumerate(notebooks):
        nb = nbformat.read(path, as_version=4)
        if do_execute:
            start = time.monotonic()
            if log:
                log(f"[{i + 1}/{len(notebooks)}] {path.name} ", end="")
            try:
                execute(nb, path.parent, timeout)
            except BaseException:
                if log:
                    log("failed")
                raise
            if log:
                log(f"{time.monotonic() - start:.0f} s")
        nb = copy.deepcopy(nb)
        figures = inline_figures(nb, path.stem)
        prev_link = f'<a href="{stems[i - 1]}.html">← {html.escape(stems[i - 1])}</a>' if i > 0 else ""
        next_link = f'<a href="{stems[i + 1]}.html">{html.escape(stems[i + 1])} →</a>' if i + 1 < len(stems) else ""
        nav = f'<nav class="lorax-nav"><a href="index.html">index</a>{prev_link}{next_link}</nav>'
        page = exporter.render_page(nb, nav)
        leaks = external_urls(page)
        if leaks:
            raise RuntimeError(f"{path.name}: the page would load from the network: {leaks[:3]}")
        (out / f"{path.stem}.html").write_text(page, encoding="utf-8")
        pages.append(Page(path.stem, notebook_title(nb, path.stem), page_headings(page), figures))
    index = index_html(pages, tests_dir or ROOT / "tests")
    if external_urls(index):
        raise RuntimeError("index.html would load from the network")
    (out / "index.html").write_text(index, encoding="utf-8")
    return pages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to render (default: notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=ROOT / "site", help="output folder (default: site/)")
    parser.add_argument("--execute", action="store_true", help="execute each notebook in memory before rendering")
    parser.add_argument("--timeout", type=int, default=600, help="per-cell timeout with --execute (seconds)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    def log(line: str, end: str = "\n") -> None:
        print(line, end=end, flush=True)

    if args.execute:
        log(f"executing {len(notebooks)} notebooks (each in a fresh kernel), then rendering them into {args.out}/")
    pages = build(notebooks, args.out, args.execute, args.timeout, log=log)
    if _latex2mathml is None:
        print("note: latex2mathml is not installed; math is shown as LaTeX source", file=sys.stderr)
    for page in pages:
        print(f"{args.out / (page.stem + '.html')}: {page.figures} figures, {len(page.headings)} sections")
    print(f"{args.out / 'index.html'}: {len(pages)} notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
