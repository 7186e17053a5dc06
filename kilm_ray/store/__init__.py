"""A committed dataset as its readers see it: the manifest, the shards of a split, and the
deterministic order in which training reads them. Written by ``kilm_ray.data`` (its commit), read by
training, tuning, evaluation and ``data.masked_dataset``; so it sits below all of them.

    loader.py      the manifest and tokenizer checks, the sample store of a split, the global-batch
                   order (``BatchPlan``) and the per-worker micro-batch dataset
    node_cache.py  each node's memory-mapped copy of a split, so a rank reads only the rows it trains on
"""
