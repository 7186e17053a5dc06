"""Preprocessing throughput on the real dump excerpt: the Ray Data pipeline on 1 and on 2 CPUs against
a plain single-process loop over the same pure functions, in one run, as ratios. Also the masking
loader against what one training worker consumes.

    python bench/preprocess_throughput.py [--mode article] [--copies 4] [--repeat 2]

``--copies N`` feeds N copies of the excerpt as N dump files (page ids offset so every sample is
distinct), like the split files of a real dump: the 6 MB excerpt alone is a ~10 s job in which
Ray's fixed start-up costs (actors, dataset executions) weigh as much as the work.

Goals (issue 2): Ray Data 2 CPUs / 1 CPU >= 1.7x; masking loader >= 3x one worker's consumption.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, SHARED_DATA, save  # noqa: E402

DUMP = SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2"
WORDNET = SHARED_DATA / "wordnet-nouns.jsonl.gz"


def config(mode: str):
    from kilm_ray.config import load_config

    # A fixed tokenizer so that every variant does the same tokenization work.
    return load_config(REPO / "configs" / "tiny.yaml", [f"corpus.mode={mode}",
                                                       f"tokenizer.source=gpt2-bpe:{SHARED_DATA / 'gpt2-bpe'}"])


def make_copies(copies: int, directory: Path) -> list[str]:
    """``copies`` dump files, each the excerpt with page and revision ids offset by ``k * 10**8``."""
    import bz2
    import re

    if copies == 1:
        return [str(DUMP)]
    text = bz2.decompress(DUMP.read_bytes()).decode()
    paths = []
    for k in range(copies):
        shifted = re.sub(r"<id>(\d+)</id>", lambda m: f"<id>{int(m.group(1)) + k * 10**8}</id>", text)
        path = directory / f"enwiki-copy{k}.xml.bz2"
        path.write_bytes(bz2.compress(shifted.encode(), compresslevel=9))
        paths.append(str(path))
    return paths


def plain_loop(mode: str, dumps: list[str]) -> dict:
    """The same pure functions, one process, no Ray: parse every page, build the lookup, chunk."""
    from kilm_ray.data.corpus.articles import article_chunks, chunk_rows, page_record, paragraphs_from_doc, split_of
    from kilm_ray.data.corpus.dump import iter_raw_pages
    from kilm_ray.method.chunking import knowledge_ids
    from kilm_ray.data.corpus.knowledge import KnowledgeLookup, load_knowledge_base
    from kilm_ray.data.corpus.links import lookup_resolver
    from kilm_ray.method.tokenizer import load_tokenizer

    cfg = config(mode)
    start = time.perf_counter()
    records = [page_record(raw, mode, cfg.corpus.max_description_chars)
               for dump in dumps for raw in iter_raw_pages(dump)]
    lookup = KnowledgeLookup()
    for r in records:
        lookup.add_page(r)
    lookup.external, _ = load_knowledge_base([str(WORDNET)])
    tok = load_tokenizer(cfg.tokenizer.source)

    def encode(text):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    sep = tok.convert_tokens_to_ids("<sep>")
    rows = 0
    resolve = lookup_resolver(lookup, lambda title, desc: knowledge_ids(encode, title, desc, sep,
                                                                       cfg.data.max_knowledge_tokens))
    for r in records:
        if r["kind"] != "article":
            continue
        chunks, _ = article_chunks(paragraphs_from_doc(r["doc"]), resolve, encode,
                                   lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False),
                                   encode("\n")[0], cfg.data.max_text_tokens, cfg.data.min_chunk_tokens)
        splits = split_of(r["title"], 0, cfg.corpus.valid_fraction, cfg.corpus.test_fraction)
        rows += len(chunk_rows(r["page_id"], r["title"], chunks, splits))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "pages": len(records), "samples": rows}


def _ray_child(mode: str, cpus: int, dumps: list[str], queue) -> None:
    import logging

    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.ERROR,
             object_store_memory=1024**3)
    from kilm_ray.data.plan import preprocess

    cfg = config(mode)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        stats = preprocess(cfg, dumps, out, [str(WORDNET)])
        elapsed = time.perf_counter() - start
    samples = sum(s.get("chunks", 0) for s in stats["samples"].values())
    queue.put({"seconds": elapsed, "pages": stats["pages"]["read"], "samples": samples})
    ray.shutdown()


def ray_pipeline(mode: str, cpus: int, dumps: list[str]) -> dict:
    """The Ray Data job in a fresh Ray with ``cpus`` CPUs (cluster start-up not timed)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_ray_child, args=(mode, cpus, dumps, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def loader_throughput(seconds: float = 10.0) -> dict:
    """Masked, padded micro-batches per second from the training loader (one process) on a dataset
    preprocessed with the tiny config at bart-base lengths (source 512)."""
    import ray

    from kilm_ray.data.plan import preprocess
    from kilm_ray.store.loader import BatchPlan, SampleStore, StepDataset, special_ids_of
    from kilm_ray.method.masking import MaskingParams

    cfg = config("article").with_overrides({"data.max_source_tokens": 512, "data.max_knowledge_tokens": 128})
    with tempfile.TemporaryDirectory() as out:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=1024**3)
        preprocess(cfg, [str(DUMP)], out, [str(WORDNET)])
        ray.shutdown()
        store = SampleStore.load(out, "train")
        sp = special_ids_of(out)
    plan = BatchPlan(len(store), 32, 32, 1, epochs=100, seed=0)
    dataset = StepDataset(store, plan, 0, 0, MaskingParams(), sp, 1.0)
    n, tokens = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        item = dataset[n]
        mb = item["micro_batches"][0]
        tokens += int(mb["attention_mask"].sum() + (mb["labels"] != -100).sum())
        n += 1
    elapsed = time.perf_counter() - start
    return {"samples_per_s": n * 32 / elapsed, "nonpad_tokens_per_s": tokens / elapsed,
            "mean_source_tokens": float(sum(len(store.ids(i)) for i in range(len(store))) / len(store))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="article", choices=["lead", "article"])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-loader", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list] = {"plain": [], "ray_1cpu": [], "ray_2cpu": []}
    with tempfile.TemporaryDirectory() as tmp:
        dumps = make_copies(args.copies, Path(tmp))
        for _ in range(args.repeat):
            runs["plain"].append(plain_loop(args.mode, dumps))
            runs["ray_1cpu"].append(ray_pipeline(args.mode, 1, dumps))
            runs["ray_2cpu"].append(ray_pipeline(args.mode, 2, dumps))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    rates = {k: {"pages_per_s": r["pages"] / r["seconds"], "samples_per_s": r["samples"] / r["seconds"],
                 "seconds": r["seconds"], "samples": r["samples"]} for k, r in best.items()}
    loader = {} if args.skip_loader else loader_throughput()
    # One training worker's consumption: bart-base, batch 32, src 512 / tgt 128 on an H100 at 57.8 ms
    # per step (DESIGN.md §4) = 554 sequences/s.
    gpu_worker = 32 / 0.0578
    result = {
        "workload": f"{args.copies} x {DUMP.name}, corpus.mode={args.mode}, gpt2-bpe tokenizer, + WordNet",
        "rates": rates,
        "ratio_ray2_over_ray1": rates["ray_2cpu"]["samples_per_s"] / rates["ray_1cpu"]["samples_per_s"],
        "ratio_ray1_over_plain": rates["ray_1cpu"]["samples_per_s"] / rates["plain"]["samples_per_s"],
        "ratio_ray2_over_plain": rates["ray_2cpu"]["samples_per_s"] / rates["plain"]["samples_per_s"],
        "loader": loader,
        "loader_over_h100_bart_base_worker": loader["samples_per_s"] / gpu_worker if loader else None,
        "runs": runs,
    }
    save(f"preprocess_throughput_{args.mode}_x{args.copies}", result)


if __name__ == "__main__":
    main()
