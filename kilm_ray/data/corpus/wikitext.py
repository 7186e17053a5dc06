"""Wikitext -> clean paragraphs with entity links, as KILM (DESIGN.md §1) prescribes.

Parsing uses mwparserfromhell (a maintained MediaWiki parser with a C tokenizer): nested templates,
links inside emphasis, file captions holding links and tables are handled structurally rather than
with regexes. ``bench/wikitext_parsers.py`` measures it against a regex cleaner on the real dump
excerpt. Everything here is a pure function of its input text.
"""

from __future__ import annotations

import functools
import html
import re
from dataclasses import dataclass, field
from typing import Optional

import mwparserfromhell
import numpy as np
from mwparserfromhell import nodes as mwnodes

# Namespaces of English Wikipedia, for dumps without a <siteinfo> (``SiteNamespaces.from_siteinfo`` reads
# a dump's own, so other languages work): key -> canonical name.
ENWIKI_NAMESPACES = {
    -2: "Media", -1: "Special", 1: "Talk", 2: "User", 3: "User talk", 4: "Wikipedia", 5: "Wikipedia talk",
    6: "File", 7: "File talk", 8: "MediaWiki", 9: "MediaWiki talk", 10: "Template", 11: "Template talk",
    12: "Help", 13: "Help talk", 14: "Category", 15: "Category talk", 100: "Portal", 101: "Portal talk",
    118: "Draft", 119: "Draft talk", 710: "TimedText", 711: "TimedText talk", 828: "Module", 829: "Module talk",
}
# Names MediaWiki accepts for namespaces besides the ones a dump lists (aliases).
NAMESPACE_ALIASES = {"image": 6, "image talk": 7, "project": 4, "project talk": 5, "wp": 4, "wt": 5}
FILE_NS, CATEGORY_NS = 6, 14
# Interwiki prefixes of Wikimedia projects: [[wikt:word|text]] renders its text inline.
INTERWIKI_PREFIXES = {
    "wiktionary", "wikt", "wikisource", "s", "wikiquote", "q", "wikibooks", "b", "wikinews", "n", "wikiversity",
    "v", "wikivoyage", "voy", "commons", "c", "meta", "m", "species", "wikispecies", "wikidata", "d",
    "mediawikiwiki", "mw", "foundation", "wmf", "outreach", "incubator", "phabricator", "phab", "w", "wikipedia",
    "wikimedia", "metawikimedia",
}
# Language editions of Wikipedia: [[fr:Paris]] is an interlanguage link (no text in the article);
# [[:fr:Paris|Paris]] renders its text. A title such as "CSI: Miami" has no such prefix: an article.
LANGUAGE_PREFIXES = set("""
aa ab ace ady af ak als alt am ami an ang anp ar arc ary arz as ast atj av avk awa ay az azb ba ban bar bat-smg
bbc bcl bdr be be-tarask be-x-old bew bg bh bi bjn blk bm bn bo bpy br bs btm bug bxr ca cbk-zam cdo ce ceb ch
cho chr chy ckb co cr crh cs csb cu cv cy da dag de dga din diq dsb dtp dty dv dz ee el eml en eo es et eu ext
fa fat ff fi fiu-vro fj fo fon fr frp frr fur fy ga gag gan gcr gd gl glk gn gom gor got gpe gu guc gur guw gv
ha hak haw he hi hif ho hr hsb ht hu hy hyw hz ia iba id ie ig igl ii ik ilo inh io is it iu ja jam jbo jv ka
kaa kab kbd kbp kcg kg kge ki kj kk kl km kn knc ko koi kr krc ks ksh ku kus kv kw ky la lad lb lbe lez lfn lg
li lij lld lmo ln lo lrc lt ltg lv mad mai map-bms mdf mg mh mhr mi min mk ml mn mni mnw mos mr mrj ms mt mus
mwl my myv mzn na nah nap nds nds-nl ne new ng nia nl nn no nov nqo nr nrm nso nup nv ny oc olo om or os pa
pag pam pap pcd pcm pdc pfl pi pih pl pms pnb pnt ps pt pwn qu rm rmy rn ro roa-rup roa-tara rsk ru rue rup
rw sa sah sat sc scn sco sd se sg sh shi shn si simple sk skr sl sm smn sn so sq sr srn ss st stq su sv sw syl
szl szy ta tay tcy tdd te tet tg th ti tig tk tl tly tn to tpi tr trv ts tt tum tw ty tyv udm ug uk ur uz ve
vec vep vi vls vo vro wa war wo wuu xal xh xmf yi yo yue za zea zgh zh zh-classical zh-min-nan zh-yue zu
""".split())

# Tags whose content is not running text.
DROP_TAGS = {
    "ref", "references", "math", "chem", "ce", "gallery", "timeline", "score", "syntaxhighlight", "source",
    "pre", "nowiki", "imagemap", "graph", "mapframe", "maplink", "table", "tr", "td", "th", "caption",
    "hiero", "inputbox", "categorytree", "templatedata", "templatestyles", "poem", "includeonly", "div",
    "style", "script", "li", "dt", "dd", "ul", "ol", "dl",
}  # not <noinclude> and <onlyinclude>: the page itself shows their content (only <includeonly> is hidden)
# Templates that render inline text worth keeping; every other template is dropped.
KEEP_TEMPLATE_PARAM = {"nowrap": 1, "nobr": 1, "small": 1, "smaller": 1, "big": 1, "lang": 2, "transl": 2,
                       "nobold": 1, "noitalic": 1, "em": 1, "strong": 1, "ill": 1}
SKIP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                 "sources", "citations", "footnotes", "notes and references", "works cited"}
BAD_DESCRIPTIONS = {"thumb", "right", "wikipedia list article", "none", "left"}
BAD_PARAGRAPH_MARKERS = ("File:", "http:", "https:", "Image:")
_REDIRECT_RE = re.compile(r"^\s*#redirect\s*:?\s*\[\[([^\]|#]*)", re.I)
_FIRST_HEADING_RE = re.compile(r"^==[^=].*$|^==$", re.M)
LIST_TAGS = {"li", "dt", "dd"}  # how mwparserfromhell marks "*", "#", ";" and ":" line starts
TABLE_LINE_STARTS = ("{|", "|", "!")  # rows of a table the parser could not take as a table
_TRAIL_RE = re.compile(r"^[a-z]+")


@dataclass
class Link:
    start: int
    end: int
    target: str


@dataclass
class Paragraph:
    text: str
    links: list[Link] = field(default_factory=list)


@dataclass
class ParsedArticle:
    paragraphs: list[Paragraph]
    short_description: Optional[str]


# ----------------------------------------------------------------------------------------------
# Titles and descriptions
# ----------------------------------------------------------------------------------------------


def normalize_title(raw: str) -> Optional[str]:
    """Canonical page title of a link target: no anchor, spaces not underscores, first letter upper."""
    title = html.unescape(raw).replace("_", " ").replace("\u200e", "").split("#", 1)[0]
    title = re.sub(r"\s+", " ", title).strip().lstrip(":").strip()
    if not title:
        return None
    return title[0].upper() + title[1:]


def _name_key(raw: str) -> str:
    return re.sub(r"\s+", " ", raw.replace("_", " ")).strip().lower()


@dataclass(frozen=True)
class SiteNamespaces:
    """The namespaces of a wiki (lower-cased name or alias -> key), from its dump's ``<siteinfo>``."""

    keys: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, names: dict[int, str]) -> "SiteNamespaces":
        table = {_name_key(name): key for key, name in names.items() if key != 0 and name}
        for alias, key in NAMESPACE_ALIASES.items():
            table.setdefault(alias, key)
        return cls(tuple(sorted(table.items())))

    @classmethod
    def from_siteinfo(cls, xml: Optional[str]) -> "SiteNamespaces":
        """From the text of a dump's ``<siteinfo>`` element (English Wikipedia's when there is none)."""
        found = {int(k): html.unescape(v) for k, v in _NAMESPACE_RE.findall(xml or "")}
        return cls.of(found or ENWIKI_NAMESPACES)

    @functools.cached_property
    def table(self) -> dict[str, int]:
        return dict(self.keys)

    def namespace_of(self, title: str) -> Optional[int]:
        """The namespace key of a title's prefix ("Category:X" -> 14), None for the main namespace."""
        prefix, colon, _ = title.partition(":")
        return self.table.get(_name_key(prefix)) if colon else None

    def link_kind(self, raw_title: str) -> str:
        """How a ``[[raw_title|...]]`` link renders: "article" (an entity mention), "text" (its visible
        text, plain: a link to another namespace or wiki, or with a leading colon) or "drop" (nothing in
        the text: an embedded file, a category, an interlanguage link)."""
        title = raw_title.strip()
        colon = title.startswith(":")
        title = title[1:].strip() if colon else title
        prefix, has_prefix, _ = title.partition(":")
        if not has_prefix:
            return "article"
        name = _name_key(prefix)
        key = self.table.get(name)
        if key is not None:
            return "drop" if not colon and key in (FILE_NS, CATEGORY_NS) else "text"
        if name in INTERWIKI_PREFIXES:
            return "text"
        if name in LANGUAGE_PREFIXES:
            return "text" if colon else "drop"
        return "article"


ENWIKI = SiteNamespaces.of(ENWIKI_NAMESPACES)
_NAMESPACE_RE = re.compile(r'<namespace\b[^>]*\bkey="(-?\d+)"[^>]*>([^<]*)</namespace>')


def is_namespaced(title: str, namespaces: SiteNamespaces = ENWIKI) -> bool:
    """True for links that are not entity mentions (``File:x``, ``fr:x``, ``:Category:x``, ``wikt:x``)."""
    return namespaces.link_kind(title) != "article"


def is_article_title(title: str, ns: int, namespaces: SiteNamespaces = ENWIKI) -> bool:
    return ns == 0 and namespaces.namespace_of(title) is None


# Disambiguation pages: {{disambiguation}} and its family ({{hndis}}, {{geodis}}, {{... disambiguation}}),
# the __DISAMBIG__ magic word, or a title ending in "(disambiguation)".
_DISAMBIGUATION_TEMPLATES = {"disambiguation", "disambig", "disamb", "dab", "hndis", "geodis", "numberdis",
                             "mil-unit-dis", "letter-number combination disambiguation"}
_DISAMBIGUATION_RE = re.compile(r"\{\{\s*(?:template\s*:\s*)?([^{}|\n]{2,80}?)\s*(?:\||\}\})", re.I)


DISAMBIGUATION = "disambiguation"  # the reason recorded for a skipped disambiguation page
EMPTY_TEXT = "empty_text"  # an article page with no text kept; its short description is still knowledge


def is_disambiguation_title(title: str) -> bool:
    return title.rstrip().lower().endswith("(disambiguation)")


def is_disambiguation(title: str, wikitext: str) -> bool:
    """A disambiguation page: neither an article nor a knowledge source, and links to it carry none."""
    if is_disambiguation_title(title) or "__DISAMBIG__" in wikitext:
        return True
    for match in _DISAMBIGUATION_RE.finditer(wikitext):
        name = _name_key(match.group(1))
        if name in _DISAMBIGUATION_TEMPLATES or name.endswith(" disambiguation"):
            return True
    return False


def redirect_target(text: str) -> Optional[str]:
    """Target of a ``#REDIRECT [[X]]`` page text, normalized, else None."""
    match = _REDIRECT_RE.match(text)
    return normalize_title(match.group(1)) if match else None


def clean_description(desc: Optional[str], max_chars: int = 400) -> Optional[str]:
    """Apply DESIGN.md's filters to a description; None when it must be dropped."""
    if desc is None:
        return None
    desc = re.sub(r"\s+", " ", desc).strip()
    lowered = desc.lower()
    if (not desc or "may refer to:" in lowered or lowered.startswith("redirect")
            or lowered.strip(" .") in BAD_DESCRIPTIONS):
        return None
    if len(desc) > max_chars:
        desc = desc[:max_chars].rsplit(" ", 1)[0]
    return desc


_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "u.s", "u.k", "no", "co", "inc", "ltd",
    "mt", "gen", "col", "lt", "prof", "rev", "fr", "ft", "approx", "c", "ca", "cf", "al", "vol", "sgt", "capt",
    "gov", "sen", "rep", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
}
_SENTENCE_END = re.compile(r"[.!?](?=[\"')\]]?\s+[\"'(\[]?[A-Z0-9])")


def first_sentence(text: str) -> Optional[str]:
    """The first sentence of a paragraph, skipping abbreviations and initials (``J. R. R.``)."""
    text = text.strip()
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        word = re.search(r"(\S+)$", text[: end - 1])
        token = word.group(1).lower().lstrip("(\"'") if word else ""
        if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()) or re.fullmatch(r"(\w\.)+\w", token):
            continue
        return text[:end].strip()
    return text or None


# ----------------------------------------------------------------------------------------------
# Rendering wikicode into text with link spans
# ----------------------------------------------------------------------------------------------


class _Builder:
    """Accumulates text as pieces, each owned by a link (its index) or by none (-1)."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.owners: list[int] = []
        self.targets: list[str] = []
        self._after_link = False

    def add(self, text: str) -> None:
        if not text:
            return
        if self._after_link:
            trail = _TRAIL_RE.match(text)
            if trail:  # [[Anarchist]]s: MediaWiki renders the trail as part of the link
                self._extend(trail.group(0), len(self.targets) - 1)
                text = text[trail.end():]
        self._after_link = False
        self._extend(text, -1)

    def add_link(self, surface: str, target: str) -> None:
        if not surface.strip():
            return
        self.targets.append(target)
        self._extend(surface, len(self.targets) - 1)
        self._after_link = True

    def _extend(self, text: str, owner: int) -> None:
        if text:
            self.pieces.append(text)
            self.owners.append(owner)

    def text_and_owner(self) -> tuple[str, np.ndarray]:
        """The text, and for each character the link that owns it (-1: none)."""
        lengths = np.fromiter((len(p) for p in self.pieces), dtype=np.int64, count=len(self.pieces))
        return "".join(self.pieces), np.repeat(np.asarray(self.owners, dtype=np.int32), lengths)


def _plain(code, state: Optional[dict] = None) -> str:
    builder = _Builder()
    _render_nodes(code.nodes, builder, links=False, state={"namespaces": (state or {}).get("namespaces", ENWIKI)})
    return "".join(builder.pieces)


def _normalized_name(raw: str) -> str:
    """A template or tag name as the renderer compares it: lower case, spaces for underscores and runs."""
    return re.sub(r"\s+", " ", raw.replace("_", " ")).strip().lower()


def _template_name(node: mwnodes.Template) -> str:
    return _normalized_name(str(node.name))


def _render_nodes(nodes, out: _Builder, links: bool, state: dict) -> None:
    for node in nodes:
        if isinstance(node, mwnodes.Text):
            out.add(str(node.value))
        elif isinstance(node, mwnodes.Wikilink):
            raw_title = str(node.title)
            kind = state.get("namespaces", ENWIKI).link_kind(raw_title)
            if kind == "drop":
                continue
            surface = _plain(node.text, state) if node.text is not None else raw_title.strip().lstrip(":")
            surface = re.sub(r"\s+", " ", surface)
            target = normalize_title(raw_title) if not raw_title.strip().startswith("#") else None
            if links and target and kind == "article":
                out.add_link(surface, target)
            else:
                out.add(surface)
        elif isinstance(node, mwnodes.Template):
            name = _template_name(node)
            if name == "short description":
                if node.params and state.get("short_description") is None:
                    state["short_description"] = _plain(node.params[0].value, state)
            elif name in ("convert", "cvt"):  # {{convert|52,419|sqmi}} -> "52,419 sqmi"
                positional = [str(p.value).strip() for p in node.params if not p.showkey][:2]
                out.add(" ".join(positional))
            elif name in KEEP_TEMPLATE_PARAM:
                index = KEEP_TEMPLATE_PARAM[name]
                positional = [p for p in node.params if not p.showkey]
                if len(positional) >= index:
                    _render_nodes(positional[index - 1].value.nodes, out, links, state)
        elif isinstance(node, mwnodes.Tag):
            tag = str(node.tag).strip().lower()
            if tag in DROP_TAGS:
                continue
            if tag in ("br", "hr"):
                out.add(" ")
            elif node.contents is not None:
                _render_nodes(node.contents.nodes, out, links, state)
        elif isinstance(node, mwnodes.ExternalLink):
            if node.title is not None:
                _render_nodes(node.title.nodes, out, links=False, state=state)
        elif isinstance(node, mwnodes.HTMLEntity):
            out.add(node.normalize())
        # Comments, arguments, headings (handled by the caller) and anything else: dropped.


# Deletions that tidy text after markup is gone; each is (pattern, group to delete).
_TIDY_STEPS = [
    # Markup the parser left as text because something before it was unbalanced.
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?(?:</ref>|$)", re.I), 0),
    (re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>"), 0),
    (re.compile(r"'{2,}"), 0),
    (re.compile(r"__[A-Z]+__"), 0),  # magic words such as __NOTOC__
    (re.compile(r"\(\s*[,;:]*\s*\)"), 0),  # "( )" left by a removed template
    (re.compile(r"\((\s*[,;:][\s,;:]*)"), 1),  # "(; , Greek: ...)" -> "(Greek: ...)"
    (re.compile(r"([\s,;:]*[,;:]\s*)\)"), 1),
    (re.compile(r" (?= )"), 0),  # collapse runs of spaces
    (re.compile(r" (?=[,.;:!?)])"), 0),  # no space before punctuation
    (re.compile(r"(?<=\() "), 0),
]


_SPACE_RE = re.compile(r"\s")  # the characters str.isspace() accepts, one for one


def _tidy(text: str, owner: np.ndarray) -> tuple[str, np.ndarray]:
    """Whitespace to spaces, then each of _TIDY_STEPS deletes its matches; ``owner`` follows the
    characters. Works on spans (regex matches), never character by character in Python."""
    text = _SPACE_RE.sub(" ", text)
    for pattern, group in _TIDY_STEPS:
        spans = [(m.start(group), m.end(group)) for m in pattern.finditer(text)]
        spans = [(a, b) for a, b in spans if b > a >= 0]
        if not spans:
            continue
        kept_text, kept_owner, previous = [], [], 0
        for a, b in spans:
            kept_text.append(text[previous:a])
            kept_owner.append(owner[previous:a])
            previous = b
        kept_text.append(text[previous:])
        kept_owner.append(owner[previous:])
        text, owner = "".join(kept_text), np.concatenate(kept_owner)
    stripped = text.lstrip(" ")
    start = len(text) - len(stripped)
    stripped = stripped.rstrip(" ")
    return stripped, owner[start:start + len(stripped)]


def _paragraph(text: str, owner: np.ndarray, targets: list[str]) -> Paragraph:
    links: list[Link] = []
    if len(owner) and owner.max() >= 0:
        # Runs of one owner: boundaries where the owner changes.
        bounds = np.flatnonzero(np.diff(owner)) + 1
        starts = np.concatenate(([0], bounds)).tolist()
        ends = np.concatenate((bounds, [len(owner)])).tolist()
        for i, j in zip(starts, ends):
            link = int(owner[i])
            if link < 0:
                continue
            surface = text[i:j]
            start = i + len(surface) - len(surface.lstrip(" "))
            end = j - (len(surface) - len(surface.rstrip(" ")))
            if end > start:
                links.append(Link(start, end, targets[link]))
    return Paragraph(text, links)


def _keep_paragraph(text: str) -> bool:
    return (bool(text) and not text.lower().startswith("redirect") and not text.startswith(TABLE_LINE_STARTS)
            and not any(marker in text for marker in BAD_PARAGRAPH_MARKERS))


def _split_paragraphs(builder: _Builder) -> list[Paragraph]:
    paragraphs = []
    text, owner = builder.text_and_owner()
    start = 0
    for line in text.split("\n"):
        end = start + len(line)
        if line:
            clean, own = _tidy(line, owner[start:end])
            if _keep_paragraph(clean):
                paragraphs.append(_paragraph(clean, own, builder.targets))
        start = end + 1
    return paragraphs


_PARSER_TOKENS = mwparserfromhell.parser.tokens
_KEPT_TEMPLATES = {"short description", "convert", "cvt", *KEEP_TEMPLATE_PARAM}
# Each tag opens with TagOpenOpen and ends with exactly one of these.
_TAG_ENDS = (_PARSER_TOKENS.TagCloseSelfclose, _PARSER_TOKENS.TagCloseClose)


def _name_of(tokens: list, start: int, stops: tuple) -> Optional[str]:
    """The name that starts at tokens[start] (a template's or a tag's) when it is plain text, lower-cased
    with spaces normalized as the renderer does; None when anything else is in it."""
    parts = []
    for i in range(start, len(tokens)):
        token = tokens[i]
        if isinstance(token, stops):
            break
        if type(token) is not _PARSER_TOKENS.Text:
            return None
        parts.append(token.text)
    return _normalized_name("".join(parts))


def _subtree_end(tokens: list, start: int, opens: type, closes: tuple) -> int:
    """Index after the token that closes the node opened at tokens[start]."""
    depth = 0
    for i in range(start, len(tokens)):
        if type(tokens[i]) is opens:
            depth += 1
        elif isinstance(tokens[i], closes):
            depth -= 1
            if depth == 0:
                return i + 1
    return len(tokens)


def _prune(tokens: list) -> list:
    """Drop, before mwparserfromhell's Python tree builder sees them, the token runs of nodes the renderer
    would drop anyway: templates other than _KEPT_TEMPLATES, tags in DROP_TAGS (except list markers,
    which parse_article reads) and comments. On enwiki articles these (references, citation templates,
    infoboxes, tables, navboxes) are most of the tokens, and building their nodes was most of the parse
    time. What is kept verbatim: kept templates and link titles (their raw text is read), and any node
    whose name is not plain text (the renderer decides)."""
    t = _PARSER_TOKENS
    out: list = []
    i, n = 0, len(tokens)
    while i < n:
        token = tokens[i]
        kind = type(token)
        if kind is t.TemplateOpen:
            end = _subtree_end(tokens, i, t.TemplateOpen, (t.TemplateClose,))
            name = _name_of(tokens, i + 1, (t.TemplateParamSeparator, t.TemplateClose))
            if name is None or name in _KEPT_TEMPLATES:
                out.extend(tokens[i:end])
            i = end
        elif kind is t.TagOpenOpen:
            name = _name_of(tokens, i + 1, (t.TagAttrStart, t.TagCloseOpen, t.TagCloseSelfclose))
            if name in DROP_TAGS and name not in LIST_TAGS:
                i = _subtree_end(tokens, i, t.TagOpenOpen, _TAG_ENDS)
            else:
                out.append(token)
                i += 1
        elif kind is t.CommentStart:
            i = _subtree_end(tokens, i, t.CommentStart, (t.CommentEnd,))
        elif kind is t.WikilinkOpen:
            title_end = i + 1
            while title_end < n and type(tokens[title_end]) not in (t.WikilinkSeparator, t.WikilinkClose):
                title_end += 1
            out.extend(tokens[i:title_end])
            i = title_end
        else:
            out.append(token)
            i += 1
    return out


_NODE_END = {
    _PARSER_TOKENS.TemplateOpen: (_PARSER_TOKENS.TemplateClose,),
    _PARSER_TOKENS.ArgumentOpen: (_PARSER_TOKENS.ArgumentClose,),
    _PARSER_TOKENS.WikilinkOpen: (_PARSER_TOKENS.WikilinkClose,),
    _PARSER_TOKENS.ExternalLinkOpen: (_PARSER_TOKENS.ExternalLinkClose,),
    _PARSER_TOKENS.TagOpenOpen: _TAG_ENDS,
    _PARSER_TOKENS.HeadingStart: (_PARSER_TOKENS.HeadingEnd,),
    _PARSER_TOKENS.CommentStart: (_PARSER_TOKENS.CommentEnd,),
    _PARSER_TOKENS.HTMLEntityStart: (_PARSER_TOKENS.HTMLEntityEnd,),
}


def _top_level(tokens: list):
    """(first token, the node's tokens) for each top-level node of a token stream, without building
    the node: parse_article builds only the nodes it renders."""
    i, n = 0, len(tokens)
    while i < n:
        kind = type(tokens[i])
        end = _subtree_end(tokens, i, kind, _NODE_END[kind]) if kind in _NODE_END else i + 1
        yield tokens[i], tokens[i:end]
        i = end


def parse_article(wikitext: str, mode: str = "lead", namespaces: SiteNamespaces = ENWIKI) -> ParsedArticle:
    """Clean paragraphs (with links) of an article's lead section or of the whole article; ``namespaces``
    (the dump's) tell entity links from links to other namespaces and wikis."""
    if mode == "lead":
        heading = _FIRST_HEADING_RE.search(wikitext)
        if heading:
            wikitext = wikitext[: heading.start()]
    parser = mwparserfromhell.parser.Parser()
    tokens = _prune(parser._tokenizer.tokenize(wikitext, 0, False))
    builder = _Builder()
    state: dict = {"namespaces": namespaces}
    skipping = False
    in_list_item = False
    text_token = _PARSER_TOKENS.Text
    # Walks the top-level nodes as mwparserfromhell would build them, building only those it renders
    # (plain text is added as it is; list lines and skipped sections are never built).
    for first, span in _top_level(tokens):
        kind = type(first)
        if in_list_item:  # lists are not running text: drop up to the end of the line
            if kind is text_token and "\n" in first.text:
                in_list_item = False
                first = text_token(text=first.text.split("\n", 1)[1])
                span = [first]
                builder.add("\n")
            else:
                continue
        if kind is text_token:
            if not skipping:
                builder.add(first.text)
            continue
        if kind is _PARSER_TOKENS.TagOpenOpen and first.wiki_markup:
            node = parser._builder.build(span).nodes[0]
            if str(node.tag).lower() in LIST_TAGS:
                in_list_item = True
                continue
            if not skipping:
                _render_nodes([node], builder, links=True, state=state)
            continue
        if kind is _PARSER_TOKENS.HeadingStart:
            if mode == "lead":
                break
            node = parser._builder.build(span).nodes[0]
            skipping = _plain(node.title, state).strip().lower() in SKIP_SECTIONS
            builder.add("\n")
            continue
        if skipping and kind is not _PARSER_TOKENS.TemplateOpen:
            continue
        nodes = parser._builder.build(span).nodes
        if skipping:
            if _template_name(nodes[0]) == "short description":
                _render_nodes(nodes, builder, links=True, state=state)
            continue
        _render_nodes(nodes, builder, links=True, state=state)
    return ParsedArticle(_split_paragraphs(builder), state.get("short_description"))
