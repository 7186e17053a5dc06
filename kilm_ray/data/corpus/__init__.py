"""Reading a Wikipedia dump and knowledge bases, as pure functions (no Ray): the Ray Data stages in
``kilm_ray.data`` map them over blocks, and a plain loop can call them the same way.

    dump.py        pages-articles XML (.bz2, multistream ranges) -> raw pages; malformed pages counted
    wikitext.py    MediaWiki markup -> cleaned paragraphs with links, short descriptions, first sentences
    articles.py    one page -> a page record (article, redirect, skipped) and its chunks; the split
    links.py       link targets, redirects, the knowledge a link carries (which source, in which order)
    knowledge.py   knowledge-base files (JSONL, WordNet): keys, rows, the best description per key
    wikidata.py    Wikidata JSON entities -> knowledge rows (sitelink title, label, aliases, description)
    ranges.py      byte ranges of a large compressed file (bz2 blocks, gzip members) for parallel reads
"""
