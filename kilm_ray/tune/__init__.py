"""Ray Tune over training runs: masking and learning-rate search with early stopping.

    search.py      the search space, one trial (a TorchTrainer fit), concurrency from the cluster's
                   capacity, ASHA + Optuna, and the summary (best config, curves)
"""
