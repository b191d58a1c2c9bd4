"""MediaWiki markup -> plain text: what the Wikipedia corpus keeps of an article (prose, headings, list items)."""

from __future__ import annotations

import html
import re

__all__ = ["strip_wikitext"]

# Tags whose whole content is dropped (references, maths, galleries ...).
_DROP_TAGS = (
    "ref|references|math|chem|ce|gallery|timeline|imagemap|score|syntaxhighlight|source|graph|"
    "mapframe|maplink|hiero|templatedata|templatestyles|categorytree|inputbox"
)
_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_SELF_CLOSING_DROP_RE = re.compile(rf"<(?:{_DROP_TAGS})\b[^<>]*/\s*>", re.IGNORECASE)
_PAIRED_DROP_RE = re.compile(rf"<({_DROP_TAGS})\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_UNCLOSED_REF_RE = re.compile(r"<ref\b[^<>]*>.*?(?=\n\n|\Z)", re.IGNORECASE | re.DOTALL)
_BR_RE = re.compile(r"<br\s*/?\s*>", re.IGNORECASE)
_HTML_TAG_RE = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*>")
_EXT_LINK_RE = re.compile(r"\[(?:https?:|ftp:|//)[^\[\]\s]*(?:\s+([^\[\]]*))?\]")
# innermost [[...]]: may contain single brackets but no "[[" or "]]"
_WIKI_LINK_RE = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]([a-z]*)")
_HEADING_RE = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_BOLD_ITALIC_RE = re.compile(r"'{2,}")
_MAGIC_RE = re.compile(r"__[A-Z]+__")
_LIST_PREFIX_RE = re.compile(r"^[*#:;]+\s*")
_DROP_NAMESPACES = {
    "file",
    "image",
    "category",
    "media",
    "template",
    "help",
    "portal",
    "special",
    "user",
    "talk",
    "module",
    "draft",
    "book",
    "wikipedia",
    "wp",
    "commons",
    "mw",
    "meta",
    "species",
}
_TEXT_NAMESPACES = {
    "wikt",
    "wiktionary",
    "s",
    "wikisource",
    "q",
    "wikiquote",
    "n",
    "wikinews",
    "b",
    "wikibooks",
    "v",
    "wikiversity",
    "voy",
    "d",
    "wikidata",
}
_DROP_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
    "references and notes",
    "works cited",
    "gallery",
    "primary sources",
    "secondary sources",
    "general references",
    "other reading",
    "endnotes",
}
_INTERWIKI_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")

# Templates rendered to (some of) their text; everything else is dropped.
_TEMPLATE_LITERALS = {
    "'": "'",
    "'s": "'s",
    "snd": " – ",
    "spaced ndash": " – ",
    "ndash": "–",
    "mdash": "—",
    "nbsp": " ",
    "!": "|",
    "=": "=",
    "-": "-",
    "·": " · ",
    "dot": " · ",
    "en dash": "–",
    "em dash": "—",
    "year": "",
    "currentyear": "",
}
_TEMPLATE_FIRST_ARG = {
    "nowrap",
    "nobr",
    "small",
    "big",
    "nobold",
    "noitalic",
    "em",
    "strong",
    "smallcaps",
    "sc",
    "abbr",
    "mvar",
    "var",
    "visible anchor",
    "ill",
    "interlanguage link",
    "lang-en",
    "not a typo",
    "sic",
    "w",
    "sub",
    "sup",
    "math",
    "bold",
    "italic",
    "nowiki",
    "keypress",
    "vanchor",
    "nastaliq",
    "transl",
    "linktext",
    "lower",
    "upper",
    "uc",
    "lc",
    "lcfirst",
    "ucfirst",
    "center",
    "unicode",
}


def _split_args(inner: str) -> list[str]:
    """Split template content on ``|`` that are not inside ``[[...]]`` links."""
    args, depth, cur = [], 0, []
    i = 0
    while i < len(inner):
        if inner.startswith("[[", i):
            depth += 1
            cur.append("[[")
            i += 2
            continue
        if inner.startswith("]]", i) and depth:
            depth -= 1
            cur.append("]]")
            i += 2
            continue
        ch = inner[i]
        if ch == "|" and depth == 0:
            args.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    args.append("".join(cur))
    return args


def _render_template(inner: str) -> str:
    args = _split_args(inner)
    name = args[0].strip().lower().replace("_", " ")
    positional = [a.strip() for a in args[1:] if not re.match(r"^\s*[\w -]+\s*=", a)]
    if name in _TEMPLATE_LITERALS:
        return _TEMPLATE_LITERALS[name]
    if name in _TEMPLATE_FIRST_ARG or name.startswith("lang-"):
        return positional[0] if positional else ""
    if name in {"lang", "script", "transliteration"}:
        return positional[1] if len(positional) >= 2 else ""
    if name in {"convert", "cvt"} and len(positional) >= 2:
        if len(positional) >= 4 and positional[1] in {"to", "-", "–", "and", "or", "by", "x", "×"}:
            sep = "–" if positional[1] in {"-", "–"} else f" {positional[1]} "
            return f"{positional[0]}{sep}{positional[2]} {positional[3]}"
        return f"{positional[0]} {positional[1]}"
    if name in {"frac", "sfrac"} and positional:
        if len(positional) == 1:
            return f"1/{positional[0]}"
        if len(positional) == 2:
            return f"{positional[0]}/{positional[1]}"
        return f"{positional[0]} {positional[1]}/{positional[2]}"
    if name in {"circa", "c."} and positional:
        return f"c. {positional[0]}"
    return ""


def _strip_templates(text: str) -> str:
    """Resolve ``{{...}}`` templates, innermost first, keeping a few that carry prose."""
    stack: list[list[str]] = [[]]
    i, n = 0, len(text)
    special = re.compile(r"\{\{|\}\}")
    while i < n:
        m = special.search(text, i)
        if m is None:
            stack[-1].append(text[i:])
            break
        stack[-1].append(text[i : m.start()])
        if m.group() == "{{":
            stack.append([])
        elif len(stack) > 1:
            inner = "".join(stack.pop())
            stack[-1].append(_render_template(inner))
        # a stray "}}" at top level is dropped
        i = m.end()
    # unterminated templates (len(stack) > 1) are dropped with their content
    return "".join(stack[0])


def _strip_tables(text: str) -> str:
    """Drop ``{| ... |}`` tables (nested ones too), line based as MediaWiki parses them."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
            continue
        if depth:
            if s.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def _render_link(m: re.Match) -> str:
    inner, trail = m.group(1), m.group(2)
    if inner.startswith(":"):  # [[:Category:Foo|text]] is a plain link
        inner = inner[1:]
    target, pipe, label = inner.partition("|")
    if ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _DROP_NAMESPACES or _INTERWIKI_RE.match(prefix):
            return ""
        if prefix in _TEXT_NAMESPACES:
            target = target.split(":", 1)[1]
    if "|" in label:  # only files have several pipes; be safe
        label = label.rsplit("|", 1)[-1]
    if pipe and not label.strip():  # pipe trick: [[Foo (bar)|]] -> Foo
        label = re.sub(r"\s*\(.*?\)\s*$", "", target.split(":")[-1])
    text = label if label.strip() else target
    if not label.strip() and "#" in text:
        page, _hash, section = text.partition("#")
        text = page or section
    return text + trail


def _strip_links(text: str) -> str:
    prev = None
    while prev != text:
        prev = text
        text = _EXT_LINK_RE.sub(lambda m: m.group(1) or "", text)
        text = _WIKI_LINK_RE.sub(_render_link, text)
    return text


def _drop_sections(text: str) -> str:
    """Drop reference-like sections (References, External links, See also, ...)."""
    out, skip_level = [], None
    for line in text.split("\n"):
        m = _HEADING_RE.match(line.strip())
        if m:
            level = len(m.group(1))
            if skip_level is not None and level <= skip_level:
                skip_level = None
            if skip_level is None and m.group(2).strip().lower() in _DROP_SECTIONS:
                skip_level = level
        if skip_level is None:
            out.append(line)
    return "\n".join(out)


def strip_wikitext(text: str) -> str:
    """MediaWiki markup -> plain text paragraphs (headings kept as their own lines)."""
    text = _COMMENT_RE.sub("", text)
    text = _SELF_CLOSING_DROP_RE.sub("", text)
    text = _PAIRED_DROP_RE.sub("", text)
    text = _UNCLOSED_REF_RE.sub("", text)
    text = _strip_templates(text)
    text = _strip_tables(text)
    text = _drop_sections(text)
    text = _strip_links(text)
    text = _BR_RE.sub(" ", text)
    text = _HTML_TAG_RE.sub("", text)
    text = _MAGIC_RE.sub("", text)
    text = _BOLD_ITALIC_RE.sub("", text)
    text = html.unescape(text).replace("\xa0", " ").replace("\u200b", "")

    lines = []
    for raw in text.split("\n"):
        line = raw.strip()
        m = _HEADING_RE.match(line)
        if m:
            line = m.group(2)
        elif line.startswith(("|", "!", "----")):  # stray table rows / rules
            continue
        line = _LIST_PREFIX_RE.sub("", line)
        line = re.sub(r"^[:;,.]\s*", "", line)  # separator left by a dropped leading template
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)
        line = re.sub(r"\s*[,;:]\s*\)", ")", line)
        line = re.sub(r"\s*\(\s*\)", "", line)
        line = re.sub(r" +([,.;:!?)])", r"\1", line)
        line = re.sub(r"\( +", "(", line)
        line = line.strip()
        if not re.search(r"[A-Za-z0-9]", line):
            lines.append("")  # paragraph break
            continue
        lines.append(line)
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip()
