"""Peak memory of one batch of generation at BART's real vocabulary (50,265 tokens), as a model replica
runs it: a tiny BART (d_model 16, one layer each side) whose vocabulary is the real size, so the
``rows x vocabulary`` tensors dominate and the weights do not. Each configuration runs in a fresh
process; the figure is the growth of its peak RSS over a warmed-up baseline.

    python bench/generation_memory.py                       # 32 requests x 4 beams x 128 tokens, and greedy
    python bench/generation_memory.py --one --beams 4       # one configuration, JSON on stdout (the test's way)

``tests/test_generation.py::test_one_batch_at_the_real_vocabulary_stays_bounded`` runs ``--one`` and bounds it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 50265  # BART's (GPT-2's BPE plus four)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(requests: int, beams: int, new_tokens: int, prefix: int = 16, source: int = 32) -> dict:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    from kilm_ray.model.generation import generate

    torch.manual_seed(0)
    torch.set_num_threads(1)
    stop = VOCAB - 1
    cfg = BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                     max_position_embeddings=prefix + new_tokens + 8, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2, dropout=0.0)
    model = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # no row may end early: the stop tokens can never win
        model.final_logits_bias[0, [2, stop]] = -1e4
    encs = [[0] + [(7 * i + j) % 5000 + 10 for j in range(source - 2)] + [2] for i in range(requests)]
    prefixes = [[2, 0] + [(3 * i + j) % 5000 + 10 for j in range(prefix - 2)] for i in range(requests)]
    generate(model, encs[:1], prefixes[:1], 1, 2, [2, stop], 2, beams)  # warm-up: lazy allocations, thread pools
    before = peak_mb()
    out = generate(model, encs, prefixes, 1, 2, [2, stop], new_tokens, beams)
    after = peak_mb()
    assert all(len(o.tokens) == new_tokens for o in out), [len(o.tokens) for o in out]
    return {"requests": requests, "beams": beams, "new_tokens": new_tokens, "vocab": VOCAB,
            "baseline_rss_mb": round(before, 1), "peak_rss_mb": round(after, 1),
            "peak_growth_mb": round(after - before, 1)}


def run_one(requests: int, beams: int, new_tokens: int) -> dict:
    """The configuration in a fresh process (a peak RSS is per process)."""
    done = subprocess.run([sys.executable, __file__, "--one", "--requests", str(requests), "--beams", str(beams),
                           "--new-tokens", str(new_tokens)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", action="store_true", help="measure one configuration in this process")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--label", default="current", help="name of the results file: generation_memory_LABEL")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.requests, args.beams, args.new_tokens)))
        return
    from bench.common import machine, save

    runs = [run_one(args.requests, beams, args.new_tokens) for beams in (args.beams, 1)]
    for r in runs:
        print(f"{r['requests']} requests x {r['beams']} beam(s) x {r['new_tokens']} tokens, vocabulary {r['vocab']}: "
              f"peak RSS +{r['peak_growth_mb']:.0f} MB over the warmed-up process ({r['baseline_rss_mb']:.0f} MB)")
    print(save(f"generation_memory_{args.label}", {"machine": machine(), "runs": runs}))


if __name__ == "__main__":
    main()
