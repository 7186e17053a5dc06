"""``kilm-ray demo``: the whole chain on the embedded default, on one laptop.

fetch sample -> preprocess (Ray Data) -> train a small BART with 2 DeepSpeed workers (Ray Train; configs/demo.yaml)
-> export -> serve (Ray Serve on 127.0.0.1) -> a few describe probes over HTTP -> where things are.

The project ships no Wikipedia or WordNet text. The sample comes from package registries: the dump
excerpt inside the PyPI wheel ``gensim==4.4.0`` (its test data), WordNet from Debian's
``wordnet-base`` (``apt-get download``, no root needed). Both are cached under ~/.cache/kilm_ray.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional

log = logging.getLogger("kilm_ray.demo")
GENSIM = "gensim==4.4.0"
GENSIM_DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE = Path.home() / ".cache" / "kilm_ray" / "sample"


def fetch_dump(cache: Path) -> Path:
    """The dump excerpt, from the gensim wheel on PyPI (downloaded once)."""
    target = cache / "enwiki-sample-pages-articles.xml.bz2"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s from PyPI for its Wikipedia dump excerpt", GENSIM)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        GENSIM, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("gensim-*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(GENSIM_DUMP) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def fetch_wordnet(cache: Path) -> Optional[Path]:
    """WordNet nouns as JSONL rows, from Debian's wordnet-base (installed, or fetched with apt-get
    download). None, with a warning, where neither works (the demo then uses in-dump knowledge)."""
    from kilm_ray.corpus.knowledge import parse_wordnet_database

    target = cache / "wordnet-nouns.jsonl.gz"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wordnet = Path("/usr/share/wordnet")
        if not (wordnet / "data.noun").is_file():
            try:
                subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, check=True, capture_output=True)
                deb = next(Path(tmp).glob("wordnet-base*.deb"))
                subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], check=True)
                wordnet = Path(tmp) / "root" / "usr" / "share" / "wordnet"
            except (OSError, subprocess.CalledProcessError, StopIteration) as exc:
                log.warning("no WordNet (%s): the demo uses knowledge from the dump only", exc)
                return None
        import gzip

        rows = parse_wordnet_database(wordnet / "data.noun", wordnet / "index.noun")
        with gzip.open(target, "wt", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target


def probe_examples(data_dir: str, n: int) -> list[dict]:
    """valid_seen mentions in context, as describe requests with their gold knowledge."""
    from transformers import AutoTokenizer

    from kilm_ray.loader import SampleStore

    tokenizer = AutoTokenizer.from_pretrained(f"{data_dir}/tokenizer")
    store = SampleStore.load(data_dir, "valid_seen")
    out = []
    for i in range(len(store)):
        ids = store.ids(i)
        for ent, title in zip(store.entities(i), store.entity_titles(i)):
            decode = lambda t: tokenizer.decode(t, clean_up_tokenization_spaces=False)  # noqa: E731
            left, mention, right = decode(ids[: ent.start]), decode(ids[ent.start: ent.end]), decode(ids[ent.end:])
            gold = decode(ent.knowledge).replace("<sep>", " | ")
            out.append({"request": {"left": left[-300:], "mention": mention, "right": right[:200]}, "gold": gold})
            break  # one mention per chunk, for variety
        if len(out) >= n:
            break
    return out


def run_demo(out_dir: str, dump: Optional[str], knowledge: Optional[str], overrides: list[str],
             keep_serving: bool = False, port: int = 8000, config: Optional[str] = None) -> dict:
    from kilm_ray.cli import DEMO_CONFIG
    from kilm_ray.cluster import free_local_port, init_ray
    from kilm_ray.config import load_config
    from kilm_ray.data import preprocess
    from kilm_ray.serve.app import run_service
    from kilm_ray.serve.client import ProbeClient
    from kilm_ray.train.ray_trainer import run_training

    started = time.time()
    out = Path(out_dir).resolve()
    cfg = load_config(config or DEMO_CONFIG, overrides)
    dump_path = Path(dump) if dump else fetch_dump(CACHE)
    kb_path = Path(knowledge) if knowledge else fetch_wordnet(CACHE)
    print(f"[1/5] sample: {dump_path}" + (f" + {kb_path}" if kb_path else ""), flush=True)

    init_ray()
    data = out / "data"
    stats = preprocess(cfg, [str(dump_path)], str(data), [str(kb_path)] if kb_path else [])
    print(f"[2/5] preprocessed in {stats['elapsed_s']:.0f}s: {stats['pages']['articles']} articles, "
          f"{sum(stats['links']['with_knowledge'].values())} links with knowledge, "
          f"{stats['samples']['train']['chunks']} training chunks -> {data}", flush=True)

    runs = out / "runs"
    result = run_training(cfg, str(data), str(runs), "demo")
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    export = runs / "demo" / "export"
    m = result.metrics or {}
    print(f"[3/5] trained {m.get('step')} steps on {cfg.train.worker_bounds[1]} DeepSpeed workers: train loss "
          f"{m.get('train_loss', float('nan')):.3f}, valid_seen knowledge loss "
          f"{m.get('valid_seen_knowledge_loss', float('nan')):.3f} -> {export}", flush=True)

    settings = cfg.to_dict()["serve"]
    settings.update(host="127.0.0.1", port=free_local_port(port))
    _, url = run_service(str(export), settings, blocking=False)
    print(f"[4/5] serving {url} (POST /v1/describe, /v1/disambiguate, /v1/appositive, /v1/qa, /v1/fill)", flush=True)

    client = ProbeClient(url)
    answers = []
    print("[5/5] describe probes on entities the model saw in training (valid_seen):", flush=True)
    for example in probe_examples(str(data), 5):
        reply = client.post("describe", example["request"])
        answers.append({**example, "answer": reply})
        context = (example["request"]["left"][-60:] + "<ent>" + example["request"]["mention"] + "</ent>" +
                   example["request"]["right"][:40]).replace("\n", " ")
        print(f"  ...{context}...\n    gold:  {example['gold'][:120]}\n    model: {reply['title']} | "
              f"{reply['description'][:100]}", flush=True)
    summary = {"data": str(data), "stats": str(data / "stats.json"), "run": str(runs / "demo"),
               "checkpoints": sorted(str(p) for p in (runs / "demo").glob("checkpoint_0*")),
               "tensorboard": str(runs / "demo" / "tensorboard"), "export": str(export), "url": url,
               "minutes": round((time.time() - started) / 60, 1)}
    (out / "demo.json").write_text(json.dumps({"summary": summary, "answers": answers}, indent=2))
    print("\nWhere everything is:\n" + "\n".join(f"  {k:12s} {v}" for k, v in summary.items()), flush=True)
    if keep_serving:
        print(f"\nServing {url} until Ctrl-C. Try:\n  kilm-ray probe describe "
              f"\"Aristotle was a Greek <ent>philosopher</ent>.\" --url {url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    from ray import serve

    serve.shutdown()
    return summary
