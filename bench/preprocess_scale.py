"""How preprocessing's memory and time grow with the corpus: synthetic enwiki-shaped dumps and knowledge
bases (bench/synthetic_enwiki.py) at several sizes, each through ``kilm_ray.data.preprocess`` on a fresh
local Ray, with every process of the job watched.

    python bench/preprocess_scale.py --articles 5000 20000 80000 --kb-per-article 10 --cpus 2
    python bench/preprocess_scale.py --articles 20000 --cpus 1 2      # the 1-CPU / 2-CPU ratio

Per run: wall time and time per stage (from the job's own log lines), the peak resident memory of the
driver, of the largest Ray worker process and of Ray's own daemons (RSS, and RSS minus shared pages:
the object store's shared memory shows up in the RSS of every process that maps it), the CPU seconds
of all processes together, pages per CPU-second, and the passes over the parse stage's output (every
stage file a read task opens is logged, ``KILM_RAY_TRACE_READS``; ``--pythonpath`` runs another checkout's
code, e.g. the previous pipeline, with the same watcher). Goals: issue 11, peaks flat across a 16x range
(largest <= 1.25x smallest) and pages per CPU-second not falling; issue 23, largest worker <= 1.25x and
driver <= 1.1x across 64 k -> 256 k articles.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, SHARED_DATA, save  # noqa: E402
from bench.synthetic_enwiki import write_dump, write_kb  # noqa: E402

# Log lines that end each stage, in the order the job writes them (the knowledge base runs beside the parse).
STAGES = {"parse": "parsed at", "tokenizer": "tokenizer ready", "knowledge_base": "knowledge base at",
          "links": "links resolved at", "chunks_and_shards": "chunks at"}
RAY_DAEMONS = ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent", "dashboard.py", "log_monitor",
               "monitor.py")

CHILD = """
import json, logging, os, sys
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from kilm_ray.cluster import init_ray
from kilm_ray.config import load_config
try:
    from kilm_ray.data.plan import preprocess
except ImportError:  # a checkout from before the package layout of issue 30 (kilm_ray.data forwarded it)
    from kilm_ray.data import preprocess
args = json.loads(sys.argv[1])
init_ray(num_cpus=args["cpus"])
import threading, time, ray
owned = {"refs": 0, "memory_store_objects": 0, "memory_store_mb": 0.0}
stop = threading.Event()
def sample():  # what the driver owns: object refs, and the inline objects held in its own heap
    worker = ray._private.worker.global_worker.core_worker
    while not stop.is_set():
        try:
            owned["refs"] = max(owned["refs"], len(worker.get_all_reference_counts()))
            owned["memory_store_objects"] = max(owned["memory_store_objects"], worker.get_memory_store_size())
            owned["memory_store_mb"] = max(owned["memory_store_mb"], worker.get_local_memory_store_bytes_used() / 2**20)
        except Exception:
            pass
        stop.wait(1.0)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
cfg = load_config(args["config"], args["overrides"])
stats = preprocess(cfg, [args["dump"]], args["out"], [args["kb"]] if args["kb"] else [])
stop.set()
sampler.join()  # before Ray shuts down under it at exit
print("RESULT " + json.dumps({"pages": stats["pages"]["read"], "articles": stats["pages"]["articles"],
                              "chunks": stats["chunks"]["total"], "links": stats["links"],
                              "kb_entities": stats["knowledge_base"]["entities"], "elapsed_s": stats["elapsed_s"],
                              "driver_owned_peak": {k: round(v, 1) for k, v in owned.items()}}))
"""


class Watcher(threading.Thread):
    """Polls the process tree under ``root`` every ``interval`` s: peak memory per process, CPU time."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(root)
        self.interval = interval
        self.peaks: dict[int, dict] = {}
        self.stage = next(iter(STAGES))  # set by the reader of the job's log as stages finish
        self.stage_peaks: dict[str, dict[str, int]] = {}
        self.stop = threading.Event()

    def _kind(self, proc) -> str:
        if proc.pid == self.root.pid:
            return "driver"
        argv = proc.cmdline()
        head = " ".join(argv[:2])  # worker command lines name the runtime-env agent's port too
        if any(d in head for d in RAY_DAEMONS):
            return "ray_daemon"
        return "worker"  # Ray workers (task and actor processes; their titles name what they run)

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    with proc.oneshot():
                        mem = proc.memory_info()
                        cpu = proc.cpu_times()
                        entry = self.peaks.setdefault(proc.pid, {"kind": self._kind(proc), "rss": 0, "private": 0})
                        title = " ".join(proc.cmdline()[:1])[:60]
                        if title.startswith("ray::") and title != "ray::IDLE":  # the tasks it ran
                            entry.setdefault("ran", set()).add(title[5:].split(".")[0])
                        entry["rss"] = max(entry["rss"], mem.rss)
                        by_kind = self.stage_peaks.setdefault(self.stage, {})
                        by_kind[entry["kind"]] = max(by_kind.get(entry["kind"], 0), mem.rss)
                        entry["private"] = max(entry["private"], mem.rss - mem.shared)
                        entry["cpu_s"] = cpu.user + cpu.system + cpu.children_user + cpu.children_system
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.stop.wait(self.interval)

    def summary(self) -> dict:
        out: dict = {"cpu_s_all_processes": round(sum(p.get("cpu_s", 0) for p in self.peaks.values()), 1)}
        for kind in ("driver", "worker", "ray_daemon"):
            entries = [p for p in self.peaks.values() if p["kind"] == kind]
            if entries:
                out[kind] = {"processes": len(entries),
                             "peak_rss_mb": round(max(p["rss"] for p in entries) / 2**20),
                             "peak_private_mb": round(max(p["private"] for p in entries) / 2**20)}
        out["peak_rss_mb_by_stage"] = {stage: {k: round(v / 2**20) for k, v in kinds.items()}
                                       for stage, kinds in self.stage_peaks.items()}
        top = sorted(self.peaks.values(), key=lambda p: -p["rss"])[:4]
        out["largest"] = [f"{p['kind']} {round(p['rss'] / 2**20)} MB, ran: {' '.join(sorted(p.get('ran', ())))}"
                          for p in top]
        return out


def pages_passes(trace: Path) -> dict:
    """Passes over the parse stage's output, per table (the previous pipeline stored one ``pages``
    table): times its files were opened, over the number of its files."""
    opened: dict[str, list[str]] = {}
    for path in trace.read_text().splitlines() if trace.exists() else []:
        if "/pages/" in path:
            rest = path.split("/pages/", 1)[1]
            opened.setdefault(rest.split("/", 1)[0] if "/" in rest else "pages", []).append(path)
    return {table: round(len(paths) / len(set(paths)), 2) for table, paths in sorted(opened.items())}


def run_watched(cmd: list[str], env: dict, cwd=None, on_line=None):
    """Run ``cmd`` to its end under a :class:`Watcher`; its output lines (``on_line(line, watcher)`` sees each
    as it comes), wall seconds and the stopped watcher."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    watcher = Watcher(proc.pid)
    watcher.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line, watcher)
    proc.wait()
    wall = time.perf_counter() - started
    watcher.stop.set()
    watcher.join()
    return proc, lines, wall, watcher


def run_once(dump: str, kb: str | None, cpus: int, overrides: list[str], work: Path,
             pythonpath: str | None = None, keep_out: str | None = None) -> dict:
    out = keep_out or tempfile.mkdtemp(dir=work, prefix="out-")  # keep_out: the dataset stays there
    trace = Path(out + ".reads")
    args = {"cpus": cpus, "config": str(REPO / "configs" / "tiny.yaml"), "dump": dump, "kb": kb, "out": out,
            "overrides": [f"tokenizer.source=gpt2-bpe:{SHARED_DATA / 'gpt2-bpe'}", *overrides]}
    env = {**os.environ, "PYTHONPATH": pythonpath or str(REPO), "PYTHONUNBUFFERED": "1",
           "KILM_RAY_TRACE_READS": str(trace)}
    stage_names = list(STAGES)

    def next_stage(line: str, watcher: Watcher) -> None:
        for i, name in enumerate(stage_names[:-1]):
            if STAGES[name] in line:
                watcher.stage = stage_names[i + 1]

    proc, lines, wall, watcher = run_watched([sys.executable, "-c", CHILD, json.dumps(args)], env, cwd=work,
                                             on_line=next_stage)  # cwd: not this checkout
    result = next((json.loads(l.split("RESULT ", 1)[1]) for l in lines if l.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        raise RuntimeError(f"preprocess failed (exit {proc.returncode}):\n" + "".join(lines[-40:]))
    ends = {}
    for name, marker in STAGES.items():
        for line in lines:
            if marker in line and (m := re.search(r" at ([0-9.]+)s", line)):
                ends[name] = float(m.group(1))
                break
    stages, previous = {}, 0.0
    for name, at in sorted(ends.items(), key=lambda item: item[1]):  # in the order they ended
        stages[name] = round(at - previous, 1)
        previous = at
    memory = watcher.summary()
    memory["partitions"] = [l.split(": ", 1)[-1].strip() for l in lines if "shuffle partitions" in l]
    passes = pages_passes(trace)
    subprocess.run(["rm", "-rf", str(trace)] + ([] if keep_out else [out]))
    return {"cpus": cpus, "wall_s": round(wall, 1), "stage_s": stages, **result, "memory": memory,
            "pages_passes": passes, "pages_per_cpu_s": round(result["pages"] / memory["cpu_s_all_processes"], 1)}


def markdown(result: dict) -> str:
    """The runs as a BENCHMARKS.md table."""
    head = ("| articles (pages) | KB rows | CPUs | wall s | parse / kb / links / chunks s | driver peak RSS (private) MB "
            "| largest worker peak RSS (private) MB | worker processes | partitions | pages per CPU-s | passes over pages |")
    rows = [head, "|" + "---|" * 11]
    for r in result["runs"]:
        m, st = r["memory"], r["stage_s"]
        parts = ", ".join(p.split("-> ")[-1].split()[0] for p in m.get("partitions", []))
        rows.append(f"| {r['articles']:,} ({r['pages']:,}) | {r['kb_rows']:,} | {r['cpus']} | {r['wall_s']} | "
                    f"{st.get('parse')} / {st.get('knowledge_base')} / {st.get('links', '-')} / {st.get('chunks_and_shards')} | "
                    f"{m['driver']['peak_rss_mb']} ({m['driver']['peak_private_mb']}) | "
                    f"{m['worker']['peak_rss_mb']} ({m['worker']['peak_private_mb']}) | {m['worker']['processes']} | "
                    f"{parts or '-'} | {r['pages_per_cpu_s']} | {r.get('pages_passes')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, nargs="+", default=[5000, 20000, 80000])
    parser.add_argument("--kb-per-article", type=float, default=10.0, help="knowledge-base rows per article")
    parser.add_argument("--cpus", type=int, nargs="+", default=[2], help="logical CPUs of the local Ray")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kilm_scale")
    parser.add_argument("--name", default="preprocess_scale")
    parser.add_argument("--pythonpath", help="run the job with this checkout's kilm_ray (e.g. the previous code)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. corpus.link_resolution=distributed")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    for articles in args.articles:
        data = args.work / f"syn-{articles}"
        dump = data / "enwiki-synthetic-pages-articles-multistream.xml.bz2"
        kb_rows = int(articles * args.kb_per_article)
        if not dump.exists():
            write_dump(articles, data)
        kb = str(write_kb(kb_rows, articles, data)) if kb_rows and not (data / "kb.jsonl.gz").exists() else (
            str(data / "kb.jsonl.gz") if kb_rows else None)
        for cpus in args.cpus:
            run = {"articles": articles, "kb_rows": kb_rows, "dump_mb": round(dump.stat().st_size / 1e6, 1),
                   **run_once(str(dump), kb, cpus, args.overrides, args.work, args.pythonpath)}
            print(json.dumps(run), flush=True)
            runs.append(run)
    result = {"workload": "synthetic enwiki-shaped multistream dumps (bench/synthetic_enwiki.py), configs/tiny.yaml",
              "overrides": args.overrides, "runs": runs}
    sizes = sorted({r["articles"] for r in runs})
    if len(sizes) > 1:
        small = [r for r in runs if r["articles"] == sizes[0]]
        large = [r for r in runs if r["articles"] == sizes[-1]]
        growth = {}
        for kind in ("driver", "worker", "ray_daemon"):
            if kind in small[0]["memory"] and kind in large[0]["memory"]:
                growth[kind] = {m: round(large[0]["memory"][kind][m] / max(1, small[0]["memory"][kind][m]), 2)
                                for m in ("peak_rss_mb", "peak_private_mb")}
        result["largest_over_smallest"] = {"size_ratio": sizes[-1] / sizes[0], "memory": growth,
                                           "pages_per_cpu_s": round(large[0]["pages_per_cpu_s"] / small[0]["pages_per_cpu_s"], 2)}
    if len(args.cpus) > 1:
        result["speedup"] = {a: round(min(r["wall_s"] for r in runs if r["articles"] == a and r["cpus"] == min(args.cpus))
                                      / min(r["wall_s"] for r in runs if r["articles"] == a and r["cpus"] == max(args.cpus)), 2)
                             for a in sizes}
    save(args.name, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
