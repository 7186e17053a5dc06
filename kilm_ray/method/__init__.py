"""The KILM method as pure functions, shared by every stage (no Ray here, torch only where a tensor is
the input): what a sample is and how it is masked, what a probe asks and how its answer is read.

    chunking.py    tokenized chunks with entity spans: the stored unit of the corpus
    masking.py     KILM samples + BART text infilling, every draw a function of (seed, epoch, sample_id)
    tokenizer.py   the BART tokenizer with the five KILM tokens (loaded, from GPT-2 BPE files, or trained)
    probes.py      probe prompts (describe, appositive, QA, fill) and the parsing of their outputs
    metrics.py     how an answer is scored: normalization, exact match, token F1, ROUGE-L

Data writes chunks with ``chunking``; training masks them with ``masking``; training's validation, the
evaluation and Serve ask through ``probes`` and score with ``metrics``.
"""
