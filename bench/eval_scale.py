"""How ``kilm-ray eval``'s memory and time grow with the corpus: synthetic enwiki-shaped datasets
(bench/synthetic_enwiki.py, preprocessed as bench/preprocess_scale.py does) at several sizes, each
evaluated by a fresh ``kilm-ray eval`` process with every process of the job watched.

    python bench/eval_scale.py --articles 16000 64000 --cpus 2

Per size: the dataset is made once (kept under --work), a random-init model of the config's preset is
exported with the dataset's tokenizer (the evaluation's cost does not depend on what the weights know),
then ``kilm-ray eval`` runs with a fixed sample (eval.max_samples mentions, as many retention chunks,
training recall on a fixed number). Reported: wall time, the driver's peak RSS (and RSS minus shared
pages), the largest Ray worker's, and the evaluation's own counts. Goal (issue 24): the driver's peak
grows <= 1.25x for 4x the data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, SHARED_DATA, machine, save  # noqa: E402
from bench.preprocess_scale import run_once, run_watched  # noqa: E402
from bench.synthetic_enwiki import write_dump, write_kb  # noqa: E402

EXPORT = """
import json, sys
from kilm_ray.config import load_config
from kilm_ray.store.loader import special_ids_of
from kilm_ray.model.bart import build_model, export_hf
from kilm_ray.method.tokenizer import load_tokenizer
args = json.loads(sys.argv[1])
cfg = load_config(args["config"], args["overrides"])
from kilm_ray.store.loader import verify_tokenizer  # noqa: E402
tok = load_tokenizer(verify_tokenizer(args["data"]))
model = build_model(cfg.model, len(tok), special_ids_of(args["data"]), cfg.max_positions)
export_hf(model, tok, args["out"], {"step": 0, "note": "random init, for bench/eval_scale.py"})
"""


def dataset(articles: int, kb_per_article: float, work: Path, overrides: list[str]) -> Path:
    """The preprocessed synthetic dataset of ``articles`` articles (made once, kept)."""
    data = work / f"syn-{articles}"
    out = work / f"data-{articles}"
    if (out / "manifest.json").exists():
        return out
    dump = data / "enwiki-synthetic-pages-articles-multistream.xml.bz2"
    if not dump.exists():
        write_dump(articles, data)
    kb_rows = int(articles * kb_per_article)
    kb = data / "kb.jsonl.gz"
    if kb_rows and not kb.exists():
        write_kb(kb_rows, articles, data)
    run = run_once(str(dump), str(kb) if kb_rows else None, 2, overrides, work, keep_out=str(out))
    print(json.dumps({"preprocessed": articles, "wall_s": run["wall_s"]}), flush=True)
    return out


def export(data: Path, config: str, overrides: list[str]) -> Path:
    out = data.parent / f"export-{data.name}"
    if not (out / "config.json").exists():
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", EXPORT, json.dumps({"config": config, "overrides": overrides,
                                                                  "data": str(data), "out": str(out)})],
                       check=True, env=env)
    return out


def evaluate(model: Path, data: Path, config: str, overrides: list[str], report: Path) -> dict:
    kilm = str(Path(sys.executable).parent / "kilm-ray")
    cmd = [kilm, "eval", "--model", str(model), "--data", str(data), "--report", str(report), "--config", config,
           *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    proc, lines, wall, watcher = run_watched(cmd, env)
    if proc.returncode:
        raise RuntimeError("eval failed:\n" + "".join(lines[-40:]))
    metrics = json.loads((report / "metrics.json").read_text())
    memory = watcher.summary()
    memory.pop("peak_rss_mb_by_stage", None)
    split = metrics["split"]
    return {"wall_s": round(wall, 1), "memory": memory,
            "evaluated": {k: split.get(k) for k in ("mentions", "articles", "chunks", "seen", "unseen")},
            "train_samples": split.get("train_samples"), "train_articles": split.get("train_articles"),
            "trained_entities": split.get("trained_entities"), "test_samples": split.get("test_samples"),
            "held_out_check": split.get("held_out_check"),
            "retention_chunks": metrics["retention"]["chunks"],
            "training_recall_mentions": metrics.get("training_recall", {}).get("all", {}).get("mentions")}


def markdown(result: dict) -> str:
    head = ("| articles | train chunks | trained entities | evaluated mentions (articles) | wall s | driver peak RSS "
            "(private) MB | largest worker peak RSS (private) MB | worker processes |")
    rows = [head, "|" + "---|" * 8]
    for r in result["runs"]:
        m = r["memory"]
        rows.append(f"| {r['articles']:,} | {r['train_samples']:,} | {r['trained_entities']:,} | "
                    f"{r['evaluated']['mentions']} ({r['evaluated']['articles']}) | {r['wall_s']} | "
                    f"{m['driver']['peak_rss_mb']} ({m['driver']['peak_private_mb']}) | "
                    f"{m['worker']['peak_rss_mb']} ({m['worker']['peak_private_mb']}) | {m['worker']['processes']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, nargs="+", default=[16000, 64000])
    parser.add_argument("--kb-per-article", type=float, default=10.0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kilm_eval_scale")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--name", default="eval_scale")
    parser.add_argument("--eval", nargs="*", default=["eval.max_samples=300", "eval.retention_max_chunks=100",
                                                      "eval.train_recall_samples=64", "eval.batch_size=32"],
                        help="eval overrides (fixed across sizes)")
    parser.add_argument("overrides", nargs="*", help="preprocessing overrides")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prep = [f"tokenizer.source=gpt2-bpe:{SHARED_DATA / 'gpt2-bpe'}", *args.overrides]
    runs = []
    for articles in args.articles:
        data = dataset(articles, args.kb_per_article, args.work, prep)
        model = export(data, args.config, prep)
        report = args.work / f"report-{articles}"
        run = {"articles": articles, **evaluate(model, data, args.config, [*prep, *args.eval], report)}
        print(json.dumps(run), flush=True)
        runs.append(run)
    result = {"workload": "synthetic enwiki-shaped dumps preprocessed with configs/tiny.yaml (GPT-2 BPE), a random-init "
                          "model of its preset, kilm-ray eval on a fixed sample", "eval_overrides": args.eval,
              "preprocess_overrides": args.overrides, "machine": machine(), "runs": runs}
    if len(runs) > 1:
        small, large = runs[0], runs[-1]
        result["largest_over_smallest"] = {
            "size_ratio": large["articles"] / small["articles"],
            "driver_peak_rss": round(large["memory"]["driver"]["peak_rss_mb"] / small["memory"]["driver"]["peak_rss_mb"], 2),
            "driver_peak_private": round(large["memory"]["driver"]["peak_private_mb"]
                                         / small["memory"]["driver"]["peak_private_mb"], 2),
            "worker_peak_rss": round(large["memory"]["worker"]["peak_rss_mb"] / small["memory"]["worker"]["peak_rss_mb"], 2),
            "wall": round(large["wall_s"] / small["wall_s"], 2)}
    save(args.name, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
