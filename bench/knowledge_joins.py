"""External knowledge joins on the real excerpt + WordNet: how many links get knowledge by each rule
(exact title, name, name carrying the link's qualifier), what the rule before it (a title with "(...)"
fell back to its bare name's best row, whatever the qualifier) gave, and a seeded sample of external
matches to read for precision.

    python bench/knowledge_joins.py [--sample 200] [--seed 0]

Writes ``bench/results/knowledge_joins.json`` (counts), ``bench/results/knowledge_joins_sample.jsonl``
(one match a line: the linking article, the mention as written, the resolved title, the rule, the
description), ``..._qualified.jsonl`` (every match by a qualifier) and ``..._dropped.jsonl`` (the titles the old rule answered
across a qualifier and this one leaves plain, with the old description). The sample's reading (each line judged right or wrong for the entity the link points at)
is recorded in BENCHMARKS.md ("External knowledge joins"), with its ``verdict`` per line in
``bench/results/knowledge_joins_verdicts.json``.

Pure functions, one process, no Ray (the lookup path; the distributed path gives identical samples, which
``tests/test_preprocess.py`` checks).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, save  # noqa: E402

DUMP = SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2"
WORDNET = SHARED_DATA / "wordnet-nouns.jsonl.gz"


def old_rule(title: str, table: dict) -> str | None:
    """What the rule before this change answered: the lower-cased title's best row, else its bare
    name's best row (whatever the qualifier)."""
    from kilm_ray.data.corpus.knowledge import kb_key, split_qualifier

    if ("name", kb_key(title), "") in table:
        return table[("name", kb_key(title), "")]
    split = split_qualifier(title)
    return table.get(("name", kb_key(split[0]), "")) if split is not None else None


def main() -> None:
    from kilm_ray.data.corpus.articles import page_record, paragraphs_from_doc
    from kilm_ray.data.corpus.dump import iter_raw_pages
    from kilm_ray.data.corpus.knowledge import KnowledgeLookup, load_knowledge_base

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/knowledge_joins", help="where the sampled lines go")
    args = parser.parse_args()

    records = [page_record(raw, "lead", 400) for raw in iter_raw_pages(str(DUMP))]
    lookup = KnowledgeLookup(sources=("template", "first_sentence", "external"))
    for r in records:
        lookup.add_page(r)
    lookup.external, kb_stats = load_knowledge_base([str(WORDNET)])

    links: Counter = Counter()
    matches: list[dict] = []
    dropped: dict[str, dict] = {}
    for r in records:
        if r["kind"] != "article":
            continue
        for para in paragraphs_from_doc(r["doc"]):
            for link in para.links:
                title = lookup.resolve(link.target)
                found = lookup.describe(title)
                links["links"] += 1
                if found is None:
                    links["no_knowledge"] += 1
                    # A qualified title the old rule answered from a bare name's row: now left plain.
                    old = None if title in lookup.disambiguation else old_rule(title, lookup.external)
                    if old is not None:
                        links["external_dropped_vs_old_rule"] += 1
                        dropped.setdefault(title, {"article": r["title"], "mention": para.text[link.start:link.end],
                                                   "title": title, "old_description": old})
                    continue
                desc, source, rule = found
                links[source] += 1
                if rule is not None:
                    links[f"external_{rule}"] += 1
                    matches.append({"article": r["title"], "mention": para.text[link.start:link.end],
                                    "title": title, "rule": rule, "description": desc})
    distinct = {(m["title"], m["description"]): m for m in matches}
    sample = random.Random(args.seed).sample(sorted(distinct.values(), key=lambda m: (m["title"], m["article"])),
                                             min(args.sample, len(distinct)))
    counts = {"links": dict(links), "external_matches": len(matches), "distinct_external_titles": len(distinct),
              "distinct_by_rule": dict(Counter(m["rule"] for m in distinct.values())),
              "distinct_dropped_vs_old_rule": len(dropped), "knowledge_base_row_ids": kb_stats.entities,
              "sample": len(sample), "seed": args.seed}
    save("knowledge_joins", counts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in [("sample", sample),
                        ("qualified", [m for m in distinct.values() if m["rule"] == "qualified"]),  # too few to sample
                        ("dropped", [m for _, m in sorted(dropped.items())])]:
        (out / f"{name}.jsonl").write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in lines))
    print(json.dumps(counts, indent=2))
    print(f"sample of {len(sample)} distinct (title, description) matches and the rest: {out}/")


if __name__ == "__main__":
    main()
