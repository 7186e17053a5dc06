"""Build the folder that bench/gpu_check.sh installs from on an offline GPU machine (run through
bench/gpu_wheels.sh, on a machine with this project's environment and a package registry).

    bench/gpu_wheels.sh [OUT] [--python 3.10,3.11,3.12,3.13,3.14] [--platform x86_64|aarch64] [--no-data]

OUT (default .gpu_bundle/ in the repository) receives:

    wheels/        DeepSpeed built here as a wheel with no ops prebuilt (pure Python: `pip wheel --no-deps`),
                   the packages it needs that a machine with only torch, transformers, tokenizers,
                   safetensors and pyarrow may lack, tensorboard + protobuf + absl-py (the loop writes
                   TensorBoard events through torch.utils.tensorboard, which needs nothing else of
                   tensorboard's requirements),
                   setuptools (DeepSpeed's JIT builds import it), and kilm_ray itself; compiled packages
                   once per Python version asked; requirements.txt pins every one of them.
    data/          the real dump excerpt (../shared/data) preprocessed by kilm_ray with the GPT-2 BPE
                   vocabulary (50,267 tokens with KILM's five) at max_source_tokens 512 and
                   max_knowledge_tokens 128 (the bart-* configs), whole articles, WordNet knowledge: the
                   GPU machine has no Ray to preprocess with.
    bundle.json    every file with its size and sha256, the total against the 60 MiB bound, versions, the
                   commit, and the KILM sample lengths measured on data/.

Exits 1, naming the largest files, when the folder is over 60 MiB: the device tool carries at most
64 MiB beside the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bare_site import closure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KILM_SHARED_DATA", REPO.parent / "shared" / "data"))
LIMIT_BYTES = 60 * 2**20
PYTHONS = "3.10,3.11,3.12,3.13,3.14"
# On every machine that has torch and transformers (4.x or 5.x): not shipped.
ALWAYS_THERE = {"numpy", "packaging", "tqdm", "pyyaml"}
# Shipped besides DeepSpeed's own requirements, and why.
EXTRA = {
    "typing-extensions": "pydantic needs a newer one than older torch installs bring",
    "setuptools": "torch.utils.cpp_extension imports it when DeepSpeed JIT-builds an op",
    "tensorboard": "the loop's TensorBoard events (torch.utils.tensorboard needs tensorboard, protobuf and absl-py "
                   "of tensorboard's requirements, nothing else)",
    "protobuf": "tensorboard's event protos",
    "absl-py": "tensorboard's compat layer imports absl.flags",
}


def pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})})


def shipped_packages() -> dict[str, str]:
    """name -> version (as installed here, where the tests ran) of everything shipped besides
    DeepSpeed and kilm_ray."""
    names = (closure(("deepspeed",)) - closure(("torch",)) - ALWAYS_THERE - {"deepspeed"}) | set(EXTRA)
    return {name: md.version(name) for name in sorted(names)}


def platform_tags(arch: str) -> list[str]:
    return [f"manylinux2014_{arch}", f"manylinux_2_17_{arch}", f"manylinux_2_28_{arch}"]


def build_wheels(wheels: Path, pythons: list[str], arch: str) -> dict:
    wheels.mkdir(parents=True)
    report: dict = {"pythons": {}, "built": {}}
    ds_version = md.version("deepspeed")
    # DS_BUILD_OPS=0: no op compiled into the wheel (they JIT-build on first use, if ever).
    done = pip("wheel", "--no-deps", f"deepspeed=={ds_version}", "-w", str(wheels), env={"DS_BUILD_OPS": "0"})
    if done.returncode:
        raise SystemExit(f"building the DeepSpeed wheel failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    report["built"]["deepspeed"] = ds_version
    # kilm_ray from a clean copy of the package (an in-tree build reuses a stale build/ directory).
    with tempfile.TemporaryDirectory(prefix="kilm_wheel_") as tmp:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, tmp)
        shutil.copytree(REPO / "kilm_ray", Path(tmp) / "kilm_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # This environment's setuptools when it has one (offline-friendly), else pip's isolated build.
        isolation = ["--no-build-isolation"] if _has("setuptools") else []
        done = pip("wheel", "--no-deps", *isolation, tmp, "-w", str(wheels))
    if done.returncode:
        raise SystemExit(f"building the kilm_ray wheel failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    report["built"]["kilm_ray"] = md.version("kilm_ray")
    packages = shipped_packages()
    pins = [f"{k}=={v}" for k, v in packages.items()]
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for version in dict.fromkeys([here, *pythons]):
        args = ["download", "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version",
                version, "-d", str(wheels)]
        for tag in platform_tags(arch):
            args += ["--platform", tag]
        done = pip(*args, *pins)
        if done.returncode == 0:
            report["pythons"][version] = "ok"
            continue
        missing = [p for p in pins if pip(*args, p).returncode]
        if version == here:
            raise SystemExit(f"no {arch} wheels for Python {version} of {missing}:\n{done.stderr[-1500:]}")
        report["pythons"][version] = f"missing wheels: {', '.join(missing)}"
    lines = [f"deepspeed=={ds_version}", f"kilm_ray=={md.version('kilm_ray')}", *pins]
    (wheels / "requirements.txt").write_text(
        "# Installed by bench/gpu_check.sh: pip install --no-index --no-deps --find-links wheels --target SITE -r this\n"
        + "\n".join(lines) + "\n")
    report["shipped"] = {**packages, "deepspeed": ds_version, "kilm_ray": md.version("kilm_ray")}
    report["why_extra"] = EXTRA
    return report


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def build_data(out: Path, corpus_mode: str) -> dict:
    """Preprocess the excerpt with kilm_ray on a local Ray (the GPU machine has none)."""
    import ray

    from kilm_ray.config import load_config
    from kilm_ray.data.plan import preprocess

    dump = SHARED_DATA / "enwiki-sample-pages-articles.xml.bz2"
    kb = SHARED_DATA / "wordnet-nouns.jsonl.gz"
    bpe = SHARED_DATA / "gpt2-bpe"
    for f in (dump, kb, bpe):
        if not f.exists():
            raise SystemExit(f"{f} not found: the bundle's data comes from ../shared/data (KILM_SHARED_DATA)")
    cfg = load_config(REPO / "configs" / "bart-base-h100.yaml", [
        f"corpus.mode={corpus_mode}", f"tokenizer.source=gpt2-bpe:{bpe}", "corpus.task_resources={}",
        "model.pretrained=null", "model.preset=base"])
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=512 * 2**20, log_to_driver=False)
    try:
        stats = preprocess(cfg, [str(dump)], str(out), [str(kb)])
    finally:
        ray.shutdown()
    return {"source": f"{dump.name} + {kb.name}, corpus.mode={corpus_mode}, tokenizer gpt2-bpe "
                      f"({stats['tokenizer']['vocab_size']} tokens)", "max_source_tokens": cfg.data.max_source_tokens,
            "max_knowledge_tokens": cfg.data.max_knowledge_tokens, "chunks": stats["chunks"]["total"],
            "train_chunks": stats["samples"]["train"]["chunks"], "valid_eval_samples": stats["samples"]["valid"]["eval_samples"],
            "sample_lengths": sample_lengths(str(out))}


def sample_lengths(data_dir: str, epochs: int = 3) -> dict:
    """Source and target lengths of KILM training samples (masked as training masks them) over a few
    epochs: the target is the whole chunk with the knowledge filled in, the source the chunk after
    text infilling with an empty slot."""
    import numpy as np

    from kilm_ray.store.loader import SampleStore, special_ids_of
    from kilm_ray.method.masking import MaskingParams

    sp = special_ids_of(data_dir)
    cache = tempfile.mkdtemp(prefix="kilm_bundle_cache_")
    try:
        store = SampleStore.load(data_dir, "train", cache)
        src, tgt, chunk, knowledge = [], [], [], []
        for epoch in range(epochs):
            for i in range(len(store)):
                ex = store.train_example(i, 0, epoch, MaskingParams(), sp)
                src.append(len(ex.input_ids))
                tgt.append(len(ex.labels))
                chunk.append(len(store.ids(i)))
                knowledge.append(int(ex.knowledge.sum()))
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    def stats(values: list[int]) -> dict:
        a = np.asarray(values)
        return {"mean": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)),
                "p95": int(np.percentile(a, 95)), "max": int(a.max())}

    return {"samples": len(src), "epochs": epochs, "chunk_tokens": stats(chunk), "source_tokens": stats(src),
            "target_tokens": stats(tgt), "knowledge_slot_tokens": stats(knowledge),
            "target_over_source": round(float(np.mean(tgt) / np.mean(src)), 3)}


def git_info() -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "kilm_ray_tree": git("rev-parse", "HEAD:kilm_ray"),
            "kilm_ray_dirty": bool(git("status", "--porcelain", "--", "kilm_ray"))}


def file_table(out: Path) -> list[dict]:
    rows = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "bundle.json"):
        rows.append({"path": str(path.relative_to(out)), "bytes": path.stat().st_size,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=str(REPO / ".gpu_bundle"))
    parser.add_argument("--python", default=PYTHONS, help="CPython versions to fetch compiled wheels for")
    parser.add_argument("--platform", default="x86_64", choices=["x86_64", "aarch64"])
    parser.add_argument("--corpus-mode", default="article", choices=["article", "lead"],
                        help="article (default): chunks fill the 512-token budget; lead: the bart-* configs' setting")
    parser.add_argument("--no-data", action="store_true", help="wheels only")
    parser.add_argument("--no-wheels", action="store_true", help="data only")
    args = parser.parse_args()
    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for part in ("wheels", "data", "bundle.json"):  # only what this script writes
        target = out / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    bundle: dict = {"built_at": time.strftime("%Y-%m-%d %H:%M:%S"), "python_here": sys.version.split()[0],
                    "platform": args.platform, "limit_bytes": LIMIT_BYTES, **git_info()}
    if not args.no_wheels:
        bundle["wheels"] = build_wheels(out / "wheels", [v for v in args.python.split(",") if v], args.platform)
    if not args.no_data:
        bundle["data"] = build_data(out / "data", args.corpus_mode)
    files = file_table(out)
    total = sum(f["bytes"] for f in files)
    bundle.update(files=files, total_bytes=total, total_mib=round(total / 2**20, 2), seconds=round(time.time() - started, 1))
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2))
    largest = sorted(files, key=lambda f: -f["bytes"])[:5]
    print(f"{out}: {len(files)} files, {total / 2**20:.1f} MiB (bound {LIMIT_BYTES / 2**20:.0f} MiB) in "
          f"{bundle['seconds']} s")
    if bundle.get("data"):
        print("KILM sample lengths:", json.dumps(bundle["data"]["sample_lengths"]))
    if total > LIMIT_BYTES:
        print(f"ERROR: the bundle is {total / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB bound; largest: "
              + ", ".join(f"{f['path']} {f['bytes'] / 2**20:.1f} MiB" for f in largest), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
