"""Which wikitext cleaner: kilm_ray's (mwparserfromhell, a maintained MediaWiki parser) against a regex
cleaner in the style of WikiExtractor / the official KILM preprocessing, on the real dump excerpt.

    python bench/wikitext_parsers.py [--baseline REV]

Measures pages/s and quality: markup left in the text (``[[``, ``{{``, ``<ref``, ``''``, table rows...),
links extracted, and paragraphs whose text is mostly markup debris. The regex cleaner lives here only, as
the baseline the product's choice is measured against.

It also measures the product's parser against its own earlier version (``--baseline``, a git revision:
default c22c7d0, the parser before token pruning) in the same run: MB of article wikitext per CPU-second
in lead and article mode, interleaved A/B rounds, and whether both give identical paragraphs and links.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, SHARED_DATA, save  # noqa: E402

DUMP = SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2"
RESIDUE = ("[[", "]]", "{{", "}}", "<ref", "</ref", "''", "{|", "|}", "|-", "&lt;", "&gt;", "<!--", "thumb|")

_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_FILE = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}):[^\[\]]*\]\]", re.I)
_LINK = re.compile(r"\[\[([^\[\]|]+)(?:\|([^\[\]]*))?\]\]")
_EXT = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EMPH = re.compile(r"'{2,}")


def regex_clean(text: str) -> tuple[list[str], int]:
    """Lead section -> (paragraphs, links) with regexes only."""
    text = re.split(r"\n==[^=]", text, maxsplit=1)[0]
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    for _ in range(10):  # nested templates, innermost first
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    text = _TABLE.sub("", text)
    for _ in range(5):  # file links without nested links; captions holding links defeat the regex
        text, n = _FILE.subn("", text)
        if not n:
            break
    links = len(_LINK.findall(text))
    text = _LINK.sub(lambda m: m.group(2) if m.group(2) else m.group(1), text)
    text = _EXT.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    text = _EMPH.sub("", text)
    paragraphs = []
    for line in text.split("\n"):
        line = re.sub(r"\s+", " ", line).strip()
        if line and not line.startswith(("*", "#", ":", ";", "|", "!")) and not line.lower().startswith("redirect"):
            paragraphs.append(line)
    return paragraphs, links


def mw_clean(text: str) -> tuple[list[str], int]:
    from kilm_ray.data.corpus.wikitext import parse_article

    article = parse_article(text, "lead")
    return [p.text for p in article.paragraphs], sum(len(p.links) for p in article.paragraphs)


def measure(name: str, clean, texts: list[str]) -> dict:
    start = time.perf_counter()
    outputs = [clean(t) for t in texts]
    elapsed = time.perf_counter() - start
    paragraphs = [p for ps, _ in outputs for p in ps]
    residue = {m: sum(p.count(m) for p in paragraphs) for m in RESIDUE}
    debris = sum(1 for p in paragraphs if sum(c in "[]{}|<>=" for c in p) > 0.05 * len(p))
    return {"pages_per_s": len(texts) / elapsed, "seconds": elapsed, "paragraphs": len(paragraphs),
            "characters": sum(len(p) for p in paragraphs), "links": sum(n for _, n in outputs),
            "markup_residue": {k: v for k, v in residue.items() if v}, "markup_residue_total": sum(residue.values()),
            "debris_paragraphs": debris}


def load_baseline(revision: str):
    """The wikitext parser as it was at ``revision``, imported as a separate module (it moved from
    kilm_ray/corpus/ to kilm_ray/data/corpus/ with the package layout of issue 30)."""
    for where in ("kilm_ray/data/corpus/wikitext.py", "kilm_ray/corpus/wikitext.py"):
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{where}"], capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    source = shown.stdout
    path = Path(tempfile.mkdtemp()) / "baseline_wikitext.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_wikitext", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _as_data(article) -> tuple:
    return ([(p.text, [(l.start, l.end, l.target) for l in p.links]) for p in article.paragraphs],
            article.short_description)


def against_baseline(texts: list[str], revision: str, rounds: int = 3) -> dict:
    """MB of wikitext per CPU-second, product parser vs the one at ``revision``, same pages, same run."""
    from kilm_ray.data.corpus import wikitext as current

    baseline = load_baseline(revision)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    result = {"baseline_revision": revision, "megabytes": round(megabytes, 3)}
    for mode in ("lead", "article"):
        speeds: dict[str, list[float]] = {"baseline": [], "now": []}
        outputs = {}
        for _ in range(rounds):
            for name, module in (("baseline", baseline), ("now", current)):
                start = time.process_time()
                outputs[name] = [_as_data(module.parse_article(t, mode)) for t in texts]
                speeds[name].append(megabytes / (time.process_time() - start))
        ratios = [now / base for now, base in zip(speeds["now"], speeds["baseline"])]
        result[mode] = {"baseline_mb_per_cpu_s": [round(v, 2) for v in speeds["baseline"]],
                        "now_mb_per_cpu_s": [round(v, 2) for v in speeds["now"]],
                        "ratio_median": round(statistics.median(ratios), 2),
                        "pages_with_different_output": sum(a != b for a, b in zip(outputs["baseline"], outputs["now"]))}
    return result


def main() -> None:
    from kilm_ray.data.corpus.dump import iter_raw_pages, parse_page_xml

    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="c22c7d0", help="git revision of the parser to compare with")
    args = parser.parse_args()
    pages = [parse_page_xml(r.xml) for r in iter_raw_pages(str(DUMP))]
    texts = [p.text for p in pages if p.redirect is None and p.ns == 0]
    result = {"workload": f"{len(texts)} article leads of {DUMP.name}",
              "regex": measure("regex", regex_clean, texts),
              "mwparserfromhell": measure("mwparserfromhell", mw_clean, texts)}
    result["speed_ratio_mw_over_regex"] = result["mwparserfromhell"]["pages_per_s"] / result["regex"]["pages_per_s"]
    result["against_baseline"] = against_baseline(texts, args.baseline)
    save("wikitext_parsers", result)


if __name__ == "__main__":
    main()
