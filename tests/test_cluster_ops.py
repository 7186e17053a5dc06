"""Cluster operations: cluster.yaml validated by Ray's own autoscaler schema (no cloud call), job entry
points that request the right resources, the Serve config file, the demo chain, and a README that cannot
drift from the code. (`ray job submit` against a real `ray start --head` runs the README's own block, in
test_readme_blocks.py.)"""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kilm_ray.cluster import free_local_port
from kilm_ray.config import config_reference_markdown, load_config

from conftest import DUMP, REPO, WORDNET


def test_cluster_yaml_passes_ray_autoscaler_validation():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types["cpu_spot"]["resources"]["preprocess"] > 0 and "GPU" not in types["cpu_spot"]["resources"]
    assert types["v100_spot"]["node_config"]["InstanceType"] == "p3.16xlarge"
    assert types["v100_spot"]["resources"]["trainer"] == 8
    for node in ("cpu_spot", "v100_spot"):
        assert types[node]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert types[node]["max_workers"] >= 1
    # kilm_ray's images (docker/; tests/test_image.py: built on rayproject/ray:<this Ray>-py311-*): the CPU one on
    # the head and CPU nodes, the GPU one (CUDA 12.6 PyTorch) on every node type with GPUs; no node pip-installs.
    cpu_image, gpu_image = (f"{raw['docker']['head_image'].rsplit('-', 1)[0]}-{p}" for p in ("cpu", "cu126"))
    assert raw["docker"]["head_image"] == raw["docker"]["worker_image"] == cpu_image
    for name, node in types.items():
        image = raw["docker"]["head_image"] if name == prepared["head_node_type"] else \
            raw["available_node_types"][name].get("docker", {}).get("worker_image", raw["docker"]["worker_image"])
        gpu_node = node["node_config"]["InstanceType"].startswith(("p3.", "p4", "p5", "g4", "g5", "g6"))
        assert image == (gpu_image if gpu_node else cpu_image), name
        assert f"-ray{ray.__version__}-" in image, image
    assert "ray-ml" not in (REPO / "cluster.yaml").read_text().replace("old ray-ml", "")
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in raw.get(key, [])]
    assert commands and not any("pip install" in c or "torch==" in c for c in commands)
    registry = cpu_image.split("/")[0]
    assert any("docker login" in c and c.rstrip().endswith(registry) for c in raw["initialization_commands"])
    # Ray's AWS provider gives its default role to the head node only: every other node type needs a
    # profile of its own, or its S3 reads and writes fail while the driver's checks on the head pass.
    workers = [name for name in types if name != prepared["head_node_type"]]
    assert workers and all("IamInstanceProfile" in types[name]["node_config"] for name in workers), workers


def test_job_configs_place_preprocessing_on_cpu_nodes_and_training_on_gpu_nodes(ray_cluster):
    from kilm_ray.data.corpus.dump import ReadUnit
    from kilm_ray.data.corpus.wikitext import ENWIKI
    from kilm_ray.data.parse import parse_pages
    from kilm_ray.train.ray_trainer import build_trainer

    for name in ("bart-base-v100", "bart-large-v100", "bart-base-h100", "bart-large-h100"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        op = parse_pages([ReadUnit(str(DUMP))], ENWIKI, cfg)._logical_plan.dag
        placed = []
        while op is not None:
            # Ray Data's logical operators keep their task options as `ray_remote_args`.
            args = getattr(op, "ray_remote_args", None) or getattr(op, "_ray_remote_args", None) or {}
            if args:
                placed.append(args.get("resources", {}))
            op = op.input_dependencies[0] if op.input_dependencies else None
        assert placed and all(r.get("preprocess", 0) > 0 for r in placed), name
        trainer = build_trainer(cfg, "s3://bucket/data", "s3://bucket/runs", "x")
        scaling = trainer.scaling_config
        assert scaling.use_gpu and scaling.resources_per_worker["GPU"] == 1
        assert scaling.resources_per_worker["trainer"] == 1 and scaling.num_workers == (8, 32)


def test_serve_config_file_is_a_valid_serve_deploy_schema(trained_export):
    from ray.serve.schema import ServeDeploySchema

    from kilm_ray.serve.app import app_builder

    raw = yaml.safe_load((REPO / "configs" / "serve-deploy.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(raw)
    app = raw["applications"][0]
    assert schema.applications[0].import_path == "kilm_ray.serve.app:app_builder"
    args = dict(app["args"], model=trained_export, config=str(REPO / app["args"]["config"]))
    built = app_builder(args)
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="model="):
        app_builder({"config": args["config"]})
    # Not open by default: the deployed application requires its token, read from a file on each node (never
    # an arg: Serve shows args on its dashboard), and one without the file does not start.
    from kilm_ray.serve.app import deploy_settings
    from kilm_ray.serve.gate import AuthSetupError, service_token

    _, settings = deploy_settings(args)
    assert settings["auth"] == "required" and settings["auth_token_file"] == "/home/ray/.kilm/serve-token"
    assert not any("token" in str(v).lower() and k != "serve.auth_token_file" for k, v in app["args"].items())
    with pytest.raises(AuthSetupError, match="cannot read /home/ray/.kilm/serve-token"):
        service_token(settings, {})
    assert raw["http_options"]["request_timeout_s"] > 0


@pytest.mark.slow
def test_demo_chain_end_to_end(ray_cluster, tmp_path, capsys):
    """`kilm-ray demo` with the sample given locally: preprocess, 2 DeepSpeed workers, export, serve,
    probes over HTTP, and the summary of where everything went."""
    from kilm_ray.demo import run_demo

    summary = run_demo(str(tmp_path / "demo"), str(DUMP), str(WORDNET),
                       ["train.max_steps=8", "train.eval_every=8", "train.checkpoint_every=8",
                        "train.eval_max_samples=8"], port=free_local_port())
    printed = capsys.readouterr().out
    assert "[5/5] held-out knowledge" in printed and printed.count("    model: ") == 5
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert len(result["answers"]) == 5 and all("title" in a["answer"] for a in result["answers"])
    # It ends with the knowledge line, on every mention its rule picks (held out, entity seen >= 2 times).
    figures = result["knowledge"]
    # The demo's own last line (Ray's driver may still forward a worker's shutdown log after it: `(raylet) ...`).
    own = [ln for ln in printed.rstrip().splitlines() if not re.match(r"(\x1b\[[0-9;]*m)?\(\w", ln)]
    assert own[-1] == result["knowledge_line"].strip()
    assert re.fullmatch(r"held-out knowledge: \d+ mentions in \d+ articles, title exact match \d\.\d\d \(copy rule "
                        r"\d\.\d\d\), description F1 \d\.\d\d \(gold cut to 12 tokens\)", result["knowledge_line"])
    # A look at the test articles, counted in the dataset's ledger (a fresh output directory: the first).
    assert own[-2].startswith("this line is the first at this split's test articles") and figures["test_look"]["look"] == 1
    assert figures["held_out_check"]["articles_in_train"] == figures["held_out_check"]["samples_in_train"] == 0
    assert figures["mentions"] >= 50 and 0.5 < figures["copy_rule_title_exact_match"] < 1
    # configs/demo.yaml decodes titles as the service does: one behaviour for the line and the HTTP answers.
    assert len(figures["answers"]) == figures["mentions"] and "title_exact_match_generated" not in figures
    assert "scored title" not in printed
    assert Path(summary["export"], "model.safetensors").is_file() and summary["checkpoints"]


def test_sample_fetchers_use_package_registries(tmp_path):
    """The demo's sample comes from PyPI (gensim's wheel) and Debian (wordnet-base), nothing else."""
    from kilm_ray.data.corpus.dump import iter_raw_pages
    from kilm_ray.demo import fetch_dump, fetch_wordnet

    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "gensim"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"no package registry reachable: {probe.stderr.strip()[:200]}")
    dump = fetch_dump(tmp_path)
    assert dump.read_bytes() == DUMP.read_bytes()  # the very excerpt in ../shared/data
    assert sum(1 for _ in iter_raw_pages(str(dump))) == 206
    if subprocess.run(["which", "apt-get"], capture_output=True).returncode == 0:
        kb = fetch_wordnet(tmp_path)
        import gzip

        rows = [json.loads(line) for line in gzip.open(kb, "rt")]
        reference = [json.loads(line) for line in gzip.open(WORDNET, "rt")]
        assert len(rows) == len(reference) == 146_312 and rows[:100] == reference[:100]


def test_readme_and_docs_are_true():
    """README.md is what a newcomer reads first (short, the two commands, the picture, links that resolve);
    the docs pages it links hold the rest, and what they say about the code stays true."""
    readme = (REPO / "README.md").read_text()
    docs = {p.name: p.read_text() for p in sorted((REPO / "docs").glob("*.md"))}
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    demo_cmd = "bash scripts/setup.sh && .venv/bin/kilm-ray demo"
    assert test_cmd in readme and demo_cmd in readme and test_cmd in ci
    assert "```mermaid" in readme and len(readme) < 8000, f"README.md is {len(readme)} characters: keep it short"
    for page, text in {"README.md": readme, **{f"docs/{k}": v for k, v in docs.items()}}.items():
        base = REPO if page == "README.md" else REPO / "docs"
        for link in re.findall(r"\]\(([^)#:]+)(?:#[\w-]+)?\)", text):
            assert (base / link).exists(), f"{page} links {link}, which does not exist"
        for path in re.findall(r"`((?:configs|jobs|bench|deploy|scripts|kilm_ray|tests)/[\w./-]+)`", text):
            assert (REPO / path).exists(), f"{page} mentions {path}, which does not exist"
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", readme))
    assert linked == set(docs), f"pages not linked from README.md: {set(docs) - linked}"
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    reference = docs["configuration.md"]
    generated = reference[reference.index(start) + len(start): reference.index(end)].strip()
    assert generated == config_reference_markdown().strip(), \
        "run: kilm-ray config reference --write docs/configuration.md"
