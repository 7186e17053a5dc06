"""Preprocessing on Ray Data: Wikipedia dump(s) + knowledge bases -> an immutable KILM dataset.

    corpus/        pure parsing, no Ray: the dump's pages, wikitext, links and redirects, knowledge
                   sources (templates, first sentences, knowledge-base files, Wikidata), byte ranges
    plan.py        the job: inputs, run key, checks, and the graph (``preprocess``) in one function
    sources.py     read tasks: dump pages, knowledge-base byte ranges, the files of a saved stage
    parse.py       stage pages: raw pages -> page records -> articles / links / redirects / knowledge /
                   disambiguation tables
    kb.py          stage kb: knowledge-base lines -> the best (key, description) per key
    vocab.py       stage tokenizer: trained on a seeded paragraph sample (or loaded), saved with its hash
    resolution.py  stage links: links through redirects to their entity's knowledge (or the lookup path)
    shards.py      chunks -> parquet shards per split, in the dataset's directory
    commit.py      the dataset commit (manifest), reruns of a committed key; readers check its
                   tokenizer with kilm_ray.store.loader.verify_tokenizer
    stages.py      saved stages: Datasink writers that report their files; records; the work directory
    shuffle.py     task shapes, bucketed group-bys, shuffle sizes planned for the cluster's maximum
    rows.py        the tables and every row conversion between them (pure pyarrow, no Ray)
    import_kb.py   ``kilm-ray import-kb --wikidata``: a Wikidata JSON dump -> knowledge-base shards
    tables.py      the evaluation's tables (seen titles, anchor texts), grouped from the committed shards
    masked_dataset.py  a split as a masked Ray Dataset (for users who train from Ray Data)

A further output (for example tables of seen titles with counts, or surface -> targets, for evaluation)
is one more function: read a stage's tables with ``sources.read_parquet_files``, group with
``shuffle.bucketed`` and write with ``Stage.sink``, called from ``plan.preprocess`` before the commit.
"""
