"""Run kilm_ray on the lowest versions pyproject.toml allows, and on a GPU image's versions, and compare.

    .venv/bin/python scripts/dependency_floors.py [--sets floors,gpu-image] [--root DIR] [--no-cache-dir]

Each set of versions is installed with ``pip --no-deps --target`` into its own directory (DIR/<set>, default
a temporary one) that goes first on PYTHONPATH of a subprocess; everything else (torch, ray, numpy) is the
virtual environment's. The subprocess (``--probe``) tokenizes two describe prompts with the GPT-2 BPE files
of ../shared/data, builds the tiny preset's BART (kilm_ray.model.bart.build_model, weights set from a seed,
not from the version's initialisation), generates greedily with kilm_ray's step loop (``greedy_steps``: the
path of Serve, evaluation and the demo) and Hugging Face's ``generate`` as a reference, runs a beam search,
one training forward/backward (kilm_ray.train.validation.forward_losses), and an export and reload
(``export_hf`` / ``load_export``: safetensors). The same probe runs on the installed versions; every set must
give the same tokens and, within rounding, the same log-probabilities, loss and gradient norm.

Sets (transformers and the packages whose versions it pins; torch is the environment's):

- ``floors``: the floors pyproject.toml declares for transformers, tokenizers, safetensors and (test extra)
  huggingface_hub, read from pyproject.toml: what a lowest-direct resolution (uv's ``--resolution
  lowest-direct``; pip has none) picks for the transformers stack.
- ``gpu-image``: a typical GPU image's transformers 5.17.0 with huggingface_hub 1.33.0 (tokenizers and
  safetensors from the environment satisfy it). Its torch (2.11) is not installed here: PyPI's Linux
  torch is a CUDA build that does not import without several GB of nvidia-* wheels.

Exit status 1 when a set fails or differs. tests/test_dependency_floors.py runs it (slow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
# The packages of the transformers stack that a set replaces (pyproject's names).
STACK = ("transformers", "tokenizers", "safetensors", "huggingface_hub")
GPU_IMAGE = {"transformers": "5.17.0", "huggingface_hub": "1.33.0"}


def _requirements(pyproject: Path = PYPROJECT) -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values()
                                            for r in extra]


def declared_floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``{package: lowest allowed version}`` of every requirement with a ``>=`` or ``==`` bound."""
    from packaging.requirements import Requirement

    floors = {}
    for line in _requirements(pyproject):
        req = Requirement(line)
        for spec in req.specifier:
            if spec.operator in (">=", "=="):
                floors[req.name.lower().replace("-", "_")] = spec.version
    return floors


def version_sets(pyproject: Path = PYPROJECT) -> dict[str, dict[str, str]]:
    floors = declared_floors(pyproject)
    return {"floors": {name: floors[name] for name in STACK},
            "gpu-image": dict(GPU_IMAGE)}


def install(pins: dict[str, str], target: Path, no_cache: bool = False) -> float:
    """``pip install --no-deps --target``; returns the seconds it took (nothing when already installed)."""
    stamp = target / ".pins.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == pins:
        return 0.0
    started = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--upgrade", "--target", str(target)] + (["--no-cache-dir"] if no_cache else [])
    subprocess.run(cmd + [f"{name}=={version}" for name, version in pins.items()], check=True)
    stamp.write_text(json.dumps(pins))
    return time.monotonic() - started


def probe(pythonpath: Path | None, shared_data: Path, timeout: float = 300) -> dict:
    """The probe's results in a fresh interpreter, with ``pythonpath`` (if any) ahead of the environment."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    with tempfile.TemporaryDirectory(prefix="kilm_probe_") as tmp:
        out = Path(tmp) / "probe.json"
        done = subprocess.run([sys.executable, __file__, "--probe", str(out), "--shared-data", str(shared_data)],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"probe failed (PYTHONPATH={pythonpath}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
        return json.loads(out.read_text())


def differences(got: dict, want: dict, pins: dict[str, str]) -> list[str]:
    """What a set's probe got that the installed versions' probe did not (empty: the same)."""
    from packaging.version import Version

    problems = []
    for name, version in pins.items():
        if Version(got["versions"].get(name) or "0") != Version(version):
            problems.append(f"{name}: the probe imported {got['versions'].get(name)}, not {version}")
    for key in ("prompt_ids", "greedy", "hf_greedy", "beam", "reloaded_greedy"):
        if got[key] != want[key]:
            problems.append(f"{key}: {got[key]} != {want[key]} (installed versions)")
    if got["greedy"] != got["hf_greedy"]:
        problems.append(f"kilm_ray's greedy steps {got['greedy']} != Hugging Face's greedy {got['hf_greedy']}")
    for key, tol in (("greedy_logprobs", 1e-4), ("scores", 1e-4), ("loss", 1e-4), ("grad_norm", 1e-3)):
        a, b = _flat(got[key]), _flat(want[key])
        if len(a) != len(b) or any(abs(x - y) > tol * max(1.0, abs(y)) for x, y in zip(a, b)):
            problems.append(f"{key}: {got[key]} != {want[key]} (installed versions, tolerance {tol})")
    return problems


def _flat(value) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    return [x for v in value for x in _flat(v)]


# ---------------------------------------------------------------------------------------------- the probe

def _seeded_weights(model, seed: int = 0) -> None:
    """Every parameter from its own name's seed: the same values whatever a version's initialisation does.
    Matrices ~ N(0, 1/fan_in) (distinct logits: greedy choices far from ties), norms 1 + N(0, 0.1)."""
    import zlib

    import torch

    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=False)):
            g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def run_probe(out: Path, shared_data: Path) -> None:
    import importlib.metadata as md

    import torch

    from kilm_ray.config.train import ModelConfig
    from kilm_ray.method.probes import describe_prompt
    from kilm_ray.method.tokenizer import load_tokenizer, special_ids
    from kilm_ray.model.bart import build_model, export_hf, load_export
    from kilm_ray.model.generation import generate, score_continuations
    from kilm_ray.train.validation import forward_losses

    versions = {name: md.version(name) for name in STACK + ("torch",)}
    import transformers

    versions["transformers_file"] = transformers.__file__
    torch.manual_seed(0)
    tok = load_tokenizer(f"gpt2-bpe:{shared_data / 'gpt2-bpe'}")
    sp = special_ids(tok)
    prompts = [describe_prompt(tok, sp, "Aristotle was a Greek ", "philosopher", " and polymath."),
               describe_prompt(tok, sp, "In 1905 the physicist Albert Einstein published four papers on the ",
                               "photoelectric effect", ", special relativity and mass-energy equivalence.")]
    encs, prefixes = [p.encoder_ids for p in prompts], [p.decoder_prefix for p in prompts]
    model = build_model(ModelConfig(preset="tiny", dropout=0.0), len(tok), sp, 64)
    _seeded_weights(model)
    model.eval()
    stops = [sp.desc_end, sp.eos]
    greedy = generate(model, encs, prefixes, sp.pad, sp.eos, stops, max_new_tokens=12)
    hf = []
    for e, p, g in zip(encs, prefixes, greedy):
        seq = model.generate(input_ids=torch.tensor([e]), decoder_input_ids=torch.tensor([p]), max_new_tokens=12,
                             num_beams=1, do_sample=False, eos_token_id=stops, pad_token_id=sp.pad,
                             forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0, min_length=0)
        hf.append(seq[0, len(p):].tolist()[: len(g.tokens)])
    beam = generate(model, encs, prefixes, sp.pad, sp.eos, stops, max_new_tokens=6, num_beams=2)
    scores = score_continuations(model, [(e, p, g.tokens) for e, p, g in zip(encs, prefixes, greedy)], sp.pad)

    # One training forward/backward as the loop runs it (4-D masks, use_cache=False, per-token losses).
    class Engine:
        module = model

        def __call__(self, **kw):
            return model(**kw)

    model.train()
    width = max(len(e) for e in encs)
    ids = torch.full((2, width), sp.pad)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = torch.tensor(e)
    labels = ids.clone()
    dec = torch.cat([torch.full((2, 1), sp.eos), labels[:, :-1]], dim=1)
    labels[labels == sp.pad] = -100
    batch = {"input_ids": ids, "attention_mask": (ids != sp.pad).long(), "decoder_input_ids": dec, "labels": labels}
    losses = forward_losses(Engine(), batch)
    loss = losses.sum() / (labels != -100).sum()
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    model.eval()

    with tempfile.TemporaryDirectory(prefix="kilm_export_") as tmp:
        export_hf(model, tok, tmp, {"step": 0})
        reloaded, _tok, _meta = load_export(tmp)
        again = generate(reloaded, encs, prefixes, sp.pad, sp.eos, stops, max_new_tokens=12)
    out.write_text(json.dumps({
        "versions": versions, "prompt_ids": [encs, prefixes], "greedy": [g.tokens for g in greedy],
        "greedy_logprobs": [g.token_logprobs for g in greedy], "hf_greedy": hf, "beam": [b.tokens for b in beam],
        "scores": [s for s, _ in scores], "loss": float(loss), "grad_norm": float(grad_norm),
        "reloaded_greedy": [g.tokens for g in again],
    }))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="floors,gpu-image", help="comma-separated: floors, gpu-image")
    ap.add_argument("--root", type=Path, default=None, help="install directory (default: a temporary one)")
    ap.add_argument("--no-cache-dir", action="store_true", help="pip without its cache (a fresh machine's time)")
    ap.add_argument("--shared-data", type=Path,
                    default=Path(os.environ.get("KILM_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe is not None:
        run_probe(args.probe, args.shared_data)
        return 0
    sets = version_sets()
    unknown = set(args.sets.split(",")) - set(sets)
    if unknown:
        ap.error(f"unknown sets {sorted(unknown)} (known: {sorted(sets)})")
    with tempfile.TemporaryDirectory(prefix="kilm_floors_") as tmp:
        root = args.root or Path(tmp)
        want = probe(None, args.shared_data)
        failed = False
        for name in args.sets.split(","):
            pins = sets[name]
            seconds = install(pins, root / name, args.no_cache_dir)
            try:
                problems = differences(probe(root / name, args.shared_data), want, pins)
            except RuntimeError as exc:
                problems = [str(exc)]
            failed |= bool(problems)
            pins_text = " ".join(f"{k}=={v}" for k, v in pins.items())
            print(f"{name}: {pins_text} (installed in {seconds:.0f} s): " + ("same results as "
                  f"{' '.join(f'{k} {v}' for k, v in want['versions'].items() if k in pins)}" if not problems
                  else "FAILED\n  " + "\n  ".join(problems)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
