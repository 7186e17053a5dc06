"""Training: DeepSpeed BART workers with full, atomic, resumable checkpoints, with and without Ray.

    loop.py            the per-worker recipe (one loop for Ray Train and for torchrun / a single process)
    validation.py      validation losses and probe accuracy inside training
    control.py         when to validate, checkpoint and stop, agreed across ranks
    metrics.py         loss sums, FLOPs, MFU, ETA
    checkpoint.py      sharded checkpoints: every rank writes its part, atomically, loadable at any size
    zero.py            the DeepSpeed internals the checkpoints rely on, behind a version check
    deepspeed_config.py  the DeepSpeed config from the typed tree
    env.py             what a run needs from its launcher (rank, storage, reports, stops)
    local.py           the launcher without Ray (one process or torchrun)
    ray_trainer.py     the launcher on Ray Train: elastic worker counts, failure handling
    resources.py       worker requests and what the cluster can place (shared with Tune)
    node_prep.py       each node's copy of the dataset, prepared before the worker group exists
    spot.py            the spot-notice watcher that drains a node before it is reclaimed
    gpu_arch.py        does this PyTorch build run on this GPU (run at node setup)
    export.py          a checkpoint -> a Hugging Face directory
"""
