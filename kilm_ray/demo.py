"""``kilm-ray demo``: the whole chain on the embedded default, on one laptop.

fetch sample -> preprocess (Ray Data) -> train a small BART with 2 DeepSpeed workers (Ray Train; configs/demo.yaml)
-> export -> serve (Ray Serve on 127.0.0.1) -> a few describe probes over HTTP -> where things are.

The project ships no Wikipedia or WordNet text. The sample comes from package registries: the dump
excerpt inside the PyPI wheel ``gensim==4.4.0`` (its test data), WordNet from Debian's
``wordnet-base`` (``apt-get download``, no root needed). Both are cached under ~/.cache/kilm_ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional

log = logging.getLogger("kilm_ray.demo")
GENSIM = "gensim==4.4.0"
GENSIM_DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE = Path.home() / ".cache" / "kilm_ray" / "sample"
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


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
    from kilm_ray.data.corpus.knowledge import parse_wordnet_database

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


def probe_requests(items: list[dict], tokenizer) -> list[dict]:
    """Mention items (chunk tokens, span, knowledge) as describe requests with their gold knowledge."""
    def decode(ids) -> str:
        return tokenizer.decode([int(t) for t in ids], clean_up_tokenization_spaces=False)

    out = []
    for it in items:
        ids, start, end = it["ids"], it["start"], it["end"]
        out.append({"request": {"left": decode(ids[:start])[-300:], "mention": decode(ids[start:end]),
                                "right": decode(ids[end:])[:200]},
                    "gold": decode(it["knowledge"]).replace("<sep>", " | ").strip()})
    return out


@contextlib.contextmanager
def quiet_output(log_file: Path) -> Iterator[None]:
    """Only the demo's own lines reach the terminal. Python logging, warnings and anything written to
    stderr (file descriptor 2: Ray Data progress, Ray's C++ core, library warnings) go to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("ray")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [handler]
    loggers[1].propagate = False
    logging.captureWarnings(True)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with open(log_file, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()


def _bar(total: Optional[int], desc: str):
    from tqdm import tqdm

    # A bar only on a terminal: redrawn into a log or a pipe it would be hundreds of lines.
    return tqdm(total=total, desc=desc, file=sys.stdout, leave=False, dynamic_ncols=True,
                disable=not sys.stdout.isatty(),
                bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed}<{remaining}" if total else
                "{desc}: {elapsed}")


def with_progress(work: Callable[[], object], desc: str, total: Optional[int] = None,
                  count: Optional[Callable[[], int]] = None, every_s: float = 0.5):
    """Run ``work`` in a thread while a progress bar on stdout shows ``count()`` of ``total`` (or the
    time elapsed); the result or the exception of ``work`` comes back."""
    box: dict = {}

    def target():
        try:
            box["result"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    with _bar(total, desc) as bar:
        while thread.is_alive():
            thread.join(every_s)
            if count is not None:
                bar.n = min(count(), total or 10**12)
            bar.refresh()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _logged_steps(metrics_file: Path) -> int:
    """The last training step in metrics.jsonl (rank 0 appends one line per logged step)."""
    try:
        lines = metrics_file.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            return int(json.loads(line).get("step", 0))
    return 0


def run_demo(out_dir: str, dump: Optional[str], knowledge: Optional[str], overrides: list[str],
             keep_serving: bool = False, port: int = 8000, config: Optional[str] = None, quiet: bool = True) -> dict:
    out = Path(out_dir).resolve()
    log_file = out / "demo.log"
    if not quiet:
        return _run_demo(out, dump, knowledge, overrides, keep_serving, port, config, quiet)
    print(f"kilm-ray demo: the steps below; Ray's own logs go to {log_file} (--verbose shows them here)", flush=True)
    try:
        with quiet_output(log_file):
            return _run_demo(out, dump, knowledge, overrides, keep_serving, port, config, quiet)
    except BaseException:
        print(f"the demo stopped with an error; the details are in {log_file}", flush=True)
        raise


def _run_demo(out: Path, dump: Optional[str], knowledge: Optional[str], overrides: list[str],
              keep_serving: bool, port: int, config: Optional[str], quiet: bool) -> dict:
    from kilm_ray.cluster import free_local_port, init_ray
    from kilm_ray.config import load_config
    from kilm_ray.data.plan import preprocess
    from kilm_ray.data.commit import dataset_path
    from kilm_ray.serve.app import run_service
    from kilm_ray.serve.client import ProbeClient
    from kilm_ray.train.ray_trainer import run_training

    started = time.time()
    cfg = load_config(config or DEMO_CONFIG, overrides)
    dump_path = Path(dump) if dump else fetch_dump(CACHE)
    kb_path = Path(knowledge) if knowledge else fetch_wordnet(CACHE)
    print(f"[1/5] sample: {dump_path}" + (f" + {kb_path}" if kb_path else ""), flush=True)

    import ray

    owns_ray = not ray.is_initialized()
    init_ray(log_to_driver=not quiet)
    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    data = out / "data"
    stats = with_progress(lambda: preprocess(cfg, [str(dump_path)], str(data), [str(kb_path)] if kb_path else []),
                          "[2/5] preprocessing (Ray Data)")
    print(f"[2/5] preprocessed in {stats['elapsed_s']:.0f}s: {stats['pages']['articles']} articles, "
          f"{sum(stats['links']['with_knowledge'].values())} links with knowledge, "
          f"{stats['samples']['train']['chunks']} training chunks -> {data}", flush=True)

    runs = out / "runs"
    total = cfg.train.max_steps or None  # 0: all epochs, a bar of elapsed time
    result = with_progress(lambda: run_training(cfg, str(data), str(runs), "demo"),
                           f"[3/5] training on {cfg.train.worker_bounds[1]} DeepSpeed workers", total=total,
                           count=lambda: _logged_steps(runs / "demo" / "metrics.jsonl"))
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    export = runs / "demo" / "export"
    m = result.metrics or {}
    print(f"[3/5] trained {m.get('step')} steps on {cfg.train.worker_bounds[1]} DeepSpeed workers: train loss "
          f"{m.get('train_loss', float('nan')):.3f}, valid (held-out) knowledge loss "
          f"{m.get('valid_knowledge_loss', float('nan')):.3f} -> {export}", flush=True)

    settings = cfg.to_dict()["serve"]
    settings.update(host="127.0.0.1", port=free_local_port(port))
    _, url = run_service(str(export), settings)
    print(f"[4/5] serving {url} (a page to try probes at {url}/; POST /v1/describe, /v1/disambiguate, /v1/appositive, "
          "/v1/qa, /v1/fill; TGI's /generate, OpenAI's /v1/completions)", flush=True)

    from transformers import AutoTokenizer

    from kilm_ray.eval.harness import Context, knowledge_line, mention_items, rule_knowledge
    from kilm_ray.eval.ledger import look_line

    rule = cfg.demo
    print(f"[5/5] held-out knowledge: describe on every mention in {rule.split} articles (never trained on) of an "
          f"entity whose knowledge is in >= {rule.min_train_mentions} training mentions (a rule on the data, fixed "
          f"before training); the first {rule.examples} over HTTP:", flush=True)
    figures, chosen = with_progress(lambda: rule_knowledge(str(export), str(data), cfg, rule.split,
                                                           rule.min_train_mentions), "[5/5] probing (Ray Data)")
    client = ProbeClient(url)
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    items = mention_items(Context(str(export), str(data), cfg, "auto"), rule.split, chosen[: rule.examples])
    answers = []
    scored_answers = figures.get("answers", {})
    from_mention = set(figures.get("titles_from_mention_ids", []))
    for mention, example in zip(chosen, probe_requests(items, tokenizer)):
        reply = client.post("describe", example["request"])
        answers.append({**example, "answer": reply})
        context = (example["request"]["left"][-60:] + "<ent>" + example["request"]["mention"] + "</ent>" +
                   example["request"]["right"][:40]).replace("\n", " ")
        print(f"  ...{context}...\n    gold:  {example['gold'][:120]}\n    model: {reply['title']} | "
              f"{reply['description'][:100]}", flush=True)
        key = f"{mention['sample_id']}:{mention['entity']}"
        scored_title = scored_answers.get(key, "").split(" <sep> ")[0].strip()
        if key in from_mention and scored_title != reply["title"].strip():  # the service decodes titles only
            print(f"    scored title: {scored_title} (the mention as written: the model scores it above its decoded "
                  "title; eval.title_candidates)", flush=True)
    summary = {"data": str(data), "stats": dataset_path(str(data), "stats"), "run": str(runs / "demo"),
               "checkpoints": sorted(str(p) for p in (runs / "demo").glob("checkpoint_0*")),
               "tensorboard": str(runs / "demo" / "tensorboard"), "export": str(export), "url": url,
               "log": str(out / "demo.log") if quiet else "(printed above: --verbose)",
               "minutes": round((time.time() - started) / 60, 1)}
    line = knowledge_line(figures, cfg.data.max_knowledge_tokens)
    (out / "demo.json").write_text(json.dumps({"summary": summary, "answers": answers, "knowledge": figures,
                                               "knowledge_line": line, "rule": cfg.to_dict()["demo"]}, indent=2))
    print("\nWhere everything is:\n" + "\n".join(f"  {k:12s} {v}" for k, v in summary.items()), flush=True)
    if "title_exact_match_generated" in figures:
        print(f"titles: decoded, or the mention as written where the model scores it higher "
              f"({figures.get('titles_from_mention', 0)} of {figures['mentions']}; eval.title_candidates); decoded "
              f"titles alone: exact match {figures['title_exact_match_generated']:.2f}", flush=True)
    if "test_look" in figures:
        print(f"this line is {look_line(figures['test_look'])}", flush=True)
    print(line, flush=True)
    if keep_serving:
        print(f"\nServing {url} until Ctrl-C. Try:\n  kilm-ray probe describe "
              f"\"Aristotle was a Greek <ent>philosopher</ent>.\" --url {url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            # A terminal's Ctrl-C also reaches Ray's processes; a second one must not cut the shutdown short
            # (a KeyboardInterrupt traceback out of ray.shutdown, and the demo reported as failed).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print("stopping the service", flush=True)
    from ray import serve

    if owns_ray:  # the whole local Ray goes (serve.shutdown first would leave a task-failure line on stdout)
        ray.shutdown()
    else:
        serve.shutdown()
    return summary
