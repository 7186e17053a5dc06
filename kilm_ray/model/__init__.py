"""The model, below every stage that runs it (training, validation, evaluation, Serve).

    bart.py        BART with the KILM tokens: built from a preset or loaded from a path / hub id, the
                   Hugging Face export, per-token losses
    generation.py  batched generation and scoring with forced decoder prefixes of different lengths
"""
