"""The node images (docker/Dockerfile: GPU, docker/Dockerfile.cpu: CPU), checked statically: no Docker engine
runs here, so nothing is built. What is checked: each Dockerfile's base image is the pinned Ray image for the Ray
installed here and Python 3.11; it pins the torch, DeepSpeed and transformers that pyproject.toml, kilm_ray's
DeepSpeed check and the test environment agree on, the CUDA 12.6 torch build (V100 kernels) on the GPU image and
the CPU build on the CPU one; the files it copies survive .dockerignore; nothing comes from the Hugging Face hub;
the documented `docker build` lines produce the tags that cluster.yaml and deploy/k8s name; and the image's own
build-time check (docker/check_image.py) passes on this environment and fails on a build without Volta kernels."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from conftest import REPO

DOCKER = REPO / "docker"
VARIANTS = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # PyTorch 2.13 + CUDA 12.6
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: ends inside a continued line"
    return out


class Dockerfile:
    def __init__(self, path: Path):
        self.path = path
        self.steps = instructions(path)
        froms = [i for i, (word, _) in enumerate(self.steps) if word == "FROM"]
        assert len(froms) == 1, f"{path.name}: one stage expected"
        self.args: dict[str, str] = {}
        self.env: dict[str, str] = {}
        for word, rest in self.steps:
            if word == "ARG" and "=" in rest:
                name, value = rest.split("=", 1)
                self.args.setdefault(name, value.strip('"'))
            elif word == "ENV":
                for name, value in re.findall(r"(\w+)=(\S+)", rest):
                    self.env[name] = value
        self.base = self.expand(self.steps[froms[0]][1])

    def expand(self, text: str) -> str:
        def value(m):
            assert m.group(1) in self.args, f"{self.path.name}: ${{{m.group(1)}}} has no default"
            return self.args[m.group(1)]
        return re.sub(r"\$\{(\w+)\}", value, text).replace('"', "")

    def runs(self) -> list[str]:
        return [rest for word, rest in self.steps if word == "RUN"]

    def copies(self) -> list[list[str]]:
        return [[a for a in rest.split() if not a.startswith("--")] for word, rest in self.steps if word == "COPY"]


@lru_cache(maxsize=None)
def dockerfile(variant: str) -> Dockerfile:
    return Dockerfile(VARIANTS[variant])


def pyproject_requirements() -> dict[str, Requirement]:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def pip_install_of_the_project(df: Dockerfile) -> list[Requirement]:
    """The requirements of the RUN that installs kilm_ray (its last pip install)."""
    (run,) = [r for r in df.runs() if "pip install" in r and "${KILM_RAY_SRC}" in r]
    line = run.split("&&")[0]
    return [Requirement(df.expand(q)) for q in re.findall(r'"([^"]+)"', line) if "KILM_RAY_SRC" not in q]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_base_image_is_the_pinned_ray_image_for_python_311(variant):
    import ray

    df = dockerfile(variant)
    platform = "cu126" if variant == "gpu" else "cpu"
    assert df.base == f"rayproject/ray:{ray.__version__}-py311-{platform}"
    assert df.args["RAY_VERSION"] == ray.__version__
    assert pyproject_requirements()["ray"].specifier.contains(ray.__version__)
    assert sys.version_info[:2] == (3, 11)  # the Python the tests ran on is the image's


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_versions_are_pyprojects_and_the_tested_ones(variant):
    import ray

    from kilm_ray.train import gpu_arch
    from kilm_ray.train.zero import TESTED_DEEPSPEED

    df = dockerfile(variant)
    pins = {r.name: r for r in pip_install_of_the_project(df)}
    project = pyproject_requirements()
    assert set(pins) == {"torch", "ray", "deepspeed", "transformers"}
    for name, req in pins.items():
        (spec,) = req.specifier
        assert spec.operator == "==", req
        assert project[name].specifier.contains(spec.version), (req, project[name])
    # Ray: the base image's, with the extras kilm_ray asks for (pip must not move it).
    assert pins["ray"].specifier == Requirement(f"ray=={ray.__version__}").specifier
    assert pins["ray"].extras == project["ray"].extras
    # DeepSpeed: pyproject's exact pin and the one kilm_ray's checkpoints were tested with.
    assert str(project["deepspeed"].specifier) == str(pins["deepspeed"].specifier) == f"=={TESTED_DEEPSPEED[-1]}"
    # transformers and torch: the versions this suite ran with.
    assert df.args["TRANSFORMERS_VERSION"] == metadata.version("transformers")
    assert df.args["TORCH_VERSION"] == metadata.version("torch").split("+")[0]
    assert f"torch=={df.args['TORCH_VERSION']}" in gpu_arch.VOLTA_BUILD  # the build gpu_arch tells a V100 node to install
    first_torch = next(r for r in df.runs() if "pip install" in r and "torch==" in r)
    assert "--index-url" in first_torch and df.expand(first_torch).split("--index-url")[1].split()[0] == df.args["TORCH_INDEX"]
    if variant == "gpu":
        assert df.args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cu126" and df.args["TORCH_INDEX"] in gpu_arch.VOLTA_BUILD
        assert df.args["TORCH_CUDA"] == "12.6"
    else:
        assert df.args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert df.env.get("DS_BUILD_OPS") == "0"  # no DeepSpeed op compiled (none is used; no CUDA on the CPU image)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_image_checks_itself_with_its_own_pins(variant):
    df = dockerfile(variant)
    (check,) = [r for r in df.runs() if "check_image.py" in r]
    argv = re.sub(r"\s+", " ", df.expand(check.split("&&")[0])).split()
    assert argv[:2] == ["python", "/tmp/check_image.py"]
    sys.path.insert(0, str(DOCKER))
    try:
        import check_image
    finally:
        sys.path.remove(str(DOCKER))
    args = check_image.parser().parse_args(argv[2:])
    assert args.variant == variant
    assert (args.ray, args.torch, args.deepspeed, args.transformers) == (
        df.args["RAY_VERSION"], df.args["TORCH_VERSION"], df.args["DEEPSPEED_VERSION"], df.args["TRANSFORMERS_VERSION"])
    if variant == "gpu":
        assert args.torch_cuda == df.args["TORCH_CUDA"]
    # The check runs after the project's install, and the script it runs is the one copied in.
    runs = df.runs()
    assert runs.index(check) > runs.index(next(r for r in runs if "${KILM_RAY_SRC}" in r))
    assert ["docker/check_image.py", "/tmp/check_image.py"] in df.copies()


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule: the last pattern that matches the path (or a folder above it) decides."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_copied_files_exist_and_survive_dockerignore(variant):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    df = dockerfile(variant)
    sources = [src for copy in df.copies() for src in copy[:-1]]
    assert {"pyproject.toml", "README.md", "kilm_ray", "configs", "jobs", "docker/check_image.py"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is left out of the build context by .dockerignore"
    # the package's own files go in (data files too); the virtualenv, runs and git do not
    assert not _ignored("kilm_ray/serve/static/index.html", patterns)
    for heavy in (".venv", ".venv/lib/x.so", "runs/x", ".git/HEAD", "kilm_ray/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(heavy, patterns), heavy
    # The kilm_ray the image installs by default is the copy, editable, with configs/ beside the package: a
    # relative `config:` of serve-deploy.yaml resolves against the package's checkout (kilm_ray/serve/app.py).
    (dest,) = {copy[-1].rstrip("/") for copy in df.copies() if "pyproject.toml" in copy}
    assert df.args["KILM_RAY_SRC"] == f"-e {dest}"
    targets = {copy[0]: copy[-1].rstrip("/") for copy in df.copies() if len(copy) == 2}
    assert targets["kilm_ray"] == f"{dest}/kilm_ray" and targets["configs"] == f"{dest}/configs"
    app = f"{dest}/kilm_ray/serve/app.py"
    assert "os.path.dirname(os.path.dirname(os.path.dirname(__file__)))" in (REPO / "kilm_ray/serve/app.py").read_text()
    config = yaml.safe_load((REPO / "configs" / "serve-deploy.yaml").read_text())["applications"][0]["args"]["config"]
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(app)))
    assert os.path.join(checkout, config).startswith(targets["configs"] + "/") and (REPO / config).is_file()


def test_the_dockerignore_reader_can_refuse():
    assert _ignored("kilm_ray/cli.py", ["*"]) and not _ignored("kilm_ray/cli.py", ["*", "!kilm_ray"])
    assert _ignored("a/__pycache__/b.pyc", ["*", "!a", "**/__pycache__"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nothing_comes_from_the_hub(variant):
    text = " ".join(dockerfile(variant).runs()).lower()
    for word in ("huggingface", "hf_hub", "from_pretrained", "snapshot_download", "hf download", "curl", "wget"):
        assert word not in text, word


def _images() -> dict[str, str]:
    """variant -> the image cluster.yaml names for it."""
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    return {"cpu": raw["docker"]["head_image"], "gpu": raw["available_node_types"]["v100_spot"]["docker"]["worker_image"]}


def test_documented_builds_make_the_images_cluster_yaml_and_k8s_use():
    import ray

    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    images = _images()
    docs = " ".join((REPO / "docs" / name).read_text() for name in ("cluster.md", "kubernetes.md"))
    builds = re.findall(r"docker build (?:--platform \S+ )?-f (docker/Dockerfile(?:\.cpu)?) -t (\S+) \.", docs)
    built = {path: tag for path, tag in builds}
    assert set(built) == {"docker/Dockerfile", "docker/Dockerfile.cpu"}, builds
    for variant, image in images.items():
        repository, tag = image.rsplit(":", 1)
        platform = "cu126" if variant == "gpu" else "cpu"
        assert tag == f"{version}-ray{ray.__version__}-{platform}", image
        assert re.fullmatch(r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/kilm-ray", repository), image
        local = built[str(VARIANTS[variant].relative_to(REPO))]
        assert local.endswith(f":{tag}"), (local, tag)
        pushed = re.search(rf"docker tag {re.escape(local)} (\S+:{re.escape(tag)})", docs)
        assert pushed and f"docker push {pushed.group(1)}" in docs, f"no documented push of {tag}"
        # Both Dockerfiles carry the tag they are built as in their header.
        assert f"-t kilm-ray:{tag} ." in VARIANTS[variant].read_text()


def test_check_image_passes_here_and_fails_without_volta_kernels():
    """The build's last step, on this environment (the CPU image's versions: CPU torch 2.13.0, Ray, DeepSpeed,
    transformers), and on fake GPU builds."""
    df = dockerfile("cpu")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    argv = [sys.executable, str(DOCKER / "check_image.py"), "--variant", "cpu", "--ray", df.args["RAY_VERSION"],
            "--torch", df.args["TORCH_VERSION"], "--deepspeed", df.args["DEEPSPEED_VERSION"],
            "--transformers", df.args["TRANSFORMERS_VERSION"]]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["cuda"] is None and report["torch"].startswith(df.args["TORCH_VERSION"])

    sys.path.insert(0, str(DOCKER))
    try:
        import check_image
    finally:
        sys.path.remove(str(DOCKER))
    gpu = dockerfile("gpu").args
    args = argparse.Namespace(variant="gpu", ray=gpu["RAY_VERSION"], torch=gpu["TORCH_VERSION"], torch_cuda="12.6",
                              deepspeed=gpu["DEEPSPEED_VERSION"], transformers=gpu["TRANSFORMERS_VERSION"])
    versions = {"torch": f"{gpu['TORCH_VERSION']}+cu126", "ray": gpu["RAY_VERSION"], "deepspeed": gpu["DEEPSPEED_VERSION"],
                "transformers": gpu["TRANSFORMERS_VERSION"]}

    def run(**kw):
        options = dict(version=versions.__getitem__, python=(3, 11), torch_cuda="12.6", arch_flags=CU126,
                       on_path=lambda name: f"/bin/{name}", load=lambda name: None)
        options.update(kw)
        return check_image.problems(args, **options)

    assert run() == []
    (problem,) = run(version={**versions, "transformers": "4.0.0"}.__getitem__)
    assert "transformers 4.0.0 installed" in problem
    (problem,) = run(arch_flags=CU130, torch_cuda="12.6")
    assert "sm_70" in problem
    assert any("CUDA 13.0" in p for p in run(torch_cuda="13.0", arch_flags=CU130))
    assert any("Python 3.12" in p for p in run(python=(3, 12)))
    assert any("deepspeed 0.20.0" in p for p in run(version={**versions, "deepspeed": "0.20.0"}.__getitem__))
    assert any("kilm-ray command" in p for p in run(on_path=lambda name: None))
    assert any("import deepspeed fails" in p for p in run(load=lambda name: 1 / 0 if name == "deepspeed" else None))
    args.variant = "cpu"
    assert any("CUDA build" in p for p in run(torch_cuda="12.6"))
