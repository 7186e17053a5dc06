"""Evaluation: does the model know more entities, and can it still do what BART did?

    harness.py     the evaluation: which parts run on which items, in one Ray Data stage of probe actors
    select.py      the seeded sample of mentions / chunks of a split (bottom-k of keyed hashes)
    stages.py      the Ray Data layer: read the chosen rows, run probes in actors holding the model
    probing.py     the probes, one small function each (describe, appositive, anchors, training lookup, senses, QA,
                   retention); no Ray
    summary.py     per-item results -> figures with bootstrap intervals; stats.py: intervals, paired tests
    senses.py      WordNet usage examples (the word-sense probe's items)
    qa_files.py    question files as published; provenance.py: what produced the numbers
    report.py      metrics.json -> Markdown report and plots (``kilm-ray compare``)
    split.py       the entity groups (seen / unseen)

What training held comes from the dataset's tables (``kilm_ray.data.tables``); answers are scored with
``kilm_ray.method.metrics`` (the same functions as training's validation).
"""
