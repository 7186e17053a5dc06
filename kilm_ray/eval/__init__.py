"""Evaluation: does the model know more entities, and can it still do what BART did?

    harness.py     the evaluation: which parts run on which items, in one Ray Data stage of probe actors
    select.py      the seeded sample of mentions / chunks of a split (bottom-k of keyed hashes)
    tables.py      what training held, as tables derived by Ray Data group-bys (seen titles, anchor texts)
    stages.py      the Ray Data layer: read the chosen rows, run probes in actors holding the model
    probing.py     the probes, one small function each (describe, appositive, anchors, ceiling, senses, QA,
                   retention); no Ray
    summary.py     per-item results -> figures with bootstrap intervals; stats.py: intervals, paired tests
    metrics.py     exact match, token F1, ROUGE-L, inflections; senses.py: WordNet usage examples
    qa_files.py    question files as published; provenance.py: what produced the numbers
    report.py      metrics.json -> Markdown report and plots (``kilm-ray compare``)
    split.py       the entity groups (seen / unseen)
"""
