"""deploy/k8s/ against KubeRay's published CRD schemas (v1.7.0, tests/data/kuberay), unknown fields refused
as the API server's strict field validation refuses them; and what a schema cannot say: the images are
cluster.yaml's (kilm_ray's, docker/; GPU on GPU groups) and no runtime_env installs packages, entry points are
the documented `ray job submit` lines, the RayService runs configs/serve-deploy.yaml's application, heads take
no CPU work, spot workers drain on eviction and the termination handler's values fit them, GPU workers have a
disk for the node cache and checkpoint staging. (KubeRay's CEL rules, `x-kubernetes-validations`, are not
evaluated.)"""

import copy
import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest
import yaml

from conftest import REPO

K8S = REPO / "deploy" / "k8s"
CRDS = {"RayJob": "rayjobs", "RayService": "rayservices", "RayCluster": "rayclusters"}


@lru_cache(maxsize=None)
def crd(kind: str) -> dict:
    with gzip.open(REPO / "tests" / "data" / "kuberay" / f"ray.io_{CRDS[kind]}.v1.json.gz", "rt") as f:
        return json.load(f)


def strict(schema):
    """The schema with every object closed to fields it does not declare (a Kubernetes structural schema
    prunes them, and kubectl's default strict field validation refuses them), unless it says to keep them."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "anyOf", "allOf", "oneOf", "not") else v
           for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def problems(doc: dict) -> list[str]:
    import jsonschema

    spec = crd(doc["kind"])
    assert doc["apiVersion"] == f"{spec['group']}/{spec['version']}"
    validator = jsonschema.Draft7Validator(strict(spec["openAPIV3Schema"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def cluster_specs(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


def runtime_env(doc: dict) -> dict:
    if doc["kind"] == "RayJob":
        return yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["runtime_env"]


def test_every_manifest_fits_kuberays_crd_schemas():
    docs = manifests()
    assert {d["kind"] for d in docs.values()} == {"RayJob", "RayService"} and len(docs) == 3
    cluster = crd("RayCluster")["openAPIV3Schema"]["properties"]["spec"]
    import jsonschema

    for name, doc in docs.items():
        assert problems(doc) == [], name
        # The embedded cluster is a RayCluster spec: the RayCluster CRD's own schema agrees.
        assert list(jsonschema.Draft7Validator(strict(cluster)).iter_errors(cluster_specs(doc))) == [], name


def test_the_schema_check_catches_mistakes():
    doc = manifests()["rayjob-train.yaml:RayJob/kilm-train"]
    for path, value, found in (
        (("spec", "rayClusterSpec", "workerGroupSpec"), [], "Additional properties are not allowed ('workerGroupSpec'"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"), "four", "'four' is not of type 'integer'"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "imagePullPolicy2"),
         "Always", "('imagePullPolicy2' was unexpected)"),
        (("spec", "shutdownAfterJobFinishes"), "yes", "'yes' is not of type 'boolean'"),
    ):
        bad = copy.deepcopy(doc)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert any(found in p for p in problems(bad)), (path, problems(bad))


def _cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def pods(doc: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of every pod template: the head, each worker group, a RayJob's submitter."""
    spec = cluster_specs(doc)
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "RayJob":
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return out


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_images_are_cluster_yamls_and_no_runtime_env_installs_packages():
    import ray
    from ray.runtime_env import RuntimeEnv

    raw = _cluster_yaml()
    cpu_image, gpu_image = raw["docker"]["head_image"], raw["available_node_types"]["v100_spot"]["docker"]["worker_image"]
    assert cpu_image != gpu_image and raw["docker"]["worker_image"] == cpu_image
    seen = set()
    for name, doc in manifests().items():
        spec = cluster_specs(doc)
        assert spec["rayVersion"] == ray.__version__, name
        for group, pod in pods(doc):
            for container in pod["containers"]:
                wanted = gpu_image if gpus(container) else cpu_image
                assert container["image"] == wanted, (name, group, container["image"])
                seen.add(container["image"])
        env = runtime_env(doc)
        RuntimeEnv(**env)  # Ray's own validation of the runtime_env
        # The images hold every dependency: a runtime env that installs packages is what made every new node
        # slow (and time out), so none may come back.
        assert not {"pip", "uv", "conda", "py_executable", "image_uri", "container"} & set(env), (name, sorted(env))
        assert set(env) == {"working_dir", "env_vars"}, name
        assert env["working_dir"].startswith("s3://") and env["working_dir"].endswith(".zip")
    assert seen == {cpu_image, gpu_image}
    text = "".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert "torch==" not in text and "pip_install_options" not in text and "rayproject/ray" not in text


def test_heads_take_no_cpu_work():
    for name, doc in manifests().items():
        params = cluster_specs(doc)["headGroupSpec"]["rayStartParams"]
        assert params.get("num-cpus") == "0", name  # a string: rayStartParams values are strings
    bad = copy.deepcopy(manifests()["rayjob-train.yaml:RayJob/kilm-train"])
    cluster_specs(bad)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("is not of type 'string'" in p for p in problems(bad))


def _gib(quantity: str) -> float:
    """A Kubernetes quantity (Gi, G, Mi, Ti) in GiB."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "": 1}
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]i?)?", str(quantity)).groups()
    return float(number) * units[unit or ""] / 2**30


@pytest.mark.parametrize("manifest, node_type, smallest", [
    ("rayjob-train.yaml:RayJob/kilm-train", "v100_spot", 200),
    ("rayjob-preprocess.yaml:RayJob/kilm-preprocess", "cpu_spot", 100),
], ids=["training", "preprocessing"])
def test_workers_have_a_disk_for_the_node_cache_staging_and_spilled_objects(tmp_path, manifest, node_type, smallest):
    """The worker pods of the training job (GPU) and of preprocessing (CPU): an emptyDir of a stated size,
    requested as ephemeral storage, and TMPDIR on it, which is where kilm_ray puts the node cache and
    checkpoint staging (checked here with the pod's TMPDIR) and Ray its temporary directory (spilled objects:
    preprocessing's shuffles)."""
    from kilm_ray.config import load_config

    doc = manifests()[manifest]
    argv = shlex.split(doc["spec"]["entrypoint"])
    cfg = load_config(REPO / argv[argv.index("--config") + 1])
    assert cfg.train.node_cache_dir == ""  # so the cache follows TMPDIR
    node = _cluster_yaml()["available_node_types"][node_type]
    groups = [g for g in cluster_specs(doc)["workerGroupSpecs"]
              if bool(gpus(g["template"]["spec"]["containers"][0])) == (node_type == "v100_spot")]
    assert groups
    for group in groups:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        tmpdir = {e["name"]: e["value"] for e in container["env"]}["TMPDIR"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == tmpdir]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert "medium" not in volume["emptyDir"], "the node disk, not memory"
        size = _gib(volume["emptyDir"]["sizeLimit"])
        request = _gib(container["resources"]["requests"]["ephemeral-storage"])
        limit = _gib(container["resources"]["limits"]["ephemeral-storage"])
        # cluster.yaml's nodes of the type (root volume in GiB: EBS sizes): the pod gets most of one.
        assert smallest <= size < request <= limit <= node["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
        # Where the code puts things, under this TMPDIR (a fresh interpreter, as a Ray worker in the pod starts).
        probe = ("import json, tempfile; from kilm_ray.store.node_cache import default_root; "
                 "from ray._common.utils import get_default_ray_temp_dir; "
                 "print(json.dumps([str(default_root()), tempfile.mkdtemp(prefix='kilm_ckpt_'), get_default_ray_temp_dir()]))")
        env = {k: v for k, v in os.environ.items() if k not in ("KILM_RAY_CACHE", "RAY_TMPDIR")}
        here = tmp_path / "mnt-kilm"
        here.mkdir(exist_ok=True)
        out = subprocess.run([sys.executable, "-c", probe], env={**env, "TMPDIR": str(here)}, capture_output=True,
                             text=True, check=True, timeout=120)
        cache, staging, ray_tmp = json.loads(out.stdout.strip().splitlines()[-1])
        for path in (cache, staging, ray_tmp):
            assert path.startswith(str(here) + "/"), path
    # The serving pods are left as they were: they hold a model, not GBs of data.


def test_the_termination_handler_drains_spot_pods_in_time():
    """deploy/k8s/helm/aws-node-termination-handler.yaml: keys the chart knows (v1.x values.yaml), draining on a
    spot notice, every spot pod's own grace period honoured within the two minutes, emptyDir pods not refused,
    and the DaemonSet on the nodes the spot pods select."""
    chart_keys = {"enableSpotInterruptionDraining", "enableRebalanceMonitoring", "enableRebalanceDraining",
                  "enableScheduledEventDraining", "enableSqsTerminationDraining", "taintNode", "cordonOnly",
                  "podTerminationGracePeriod", "nodeTerminationGracePeriod", "deleteLocalData", "ignoreDaemonSets",
                  "emitKubernetesEvents", "nodeSelector", "tolerations", "metadataTries", "jsonLogging", "logLevel"}
    values = yaml.safe_load((K8S / "helm" / "aws-node-termination-handler.yaml").read_text())
    assert set(values) <= chart_keys, set(values) - chart_keys
    assert values["enableSpotInterruptionDraining"] is True and not values.get("cordonOnly")
    assert not values.get("enableSqsTerminationDraining")  # IMDS mode: a DaemonSet, no queue to set up
    assert values["deleteLocalData"] is True and values["ignoreDaemonSets"] is True
    spot = [(name, group, pod) for name, doc in manifests().items() for group, pod in pods(doc)
            if pod.get("nodeSelector", {}).get("eks.amazonaws.com/capacityType") == "SPOT"]
    assert spot and all(pod["nodeSelector"]["eks.amazonaws.com/capacityType"] == values["nodeSelector"]
                        ["eks.amazonaws.com/capacityType"] for _, _, pod in spot)
    assert values["podTerminationGracePeriod"] == -1  # the pods' own
    for name, group, pod in spot:
        grace = pod["terminationGracePeriodSeconds"]
        assert grace <= values["nodeTerminationGracePeriod"] <= 120, (name, group)  # drains at the notice
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    assert "-f deploy/k8s/helm/aws-node-termination-handler.yaml" in doc


def test_job_entry_points_are_the_documented_ray_job_submit_lines():
    from kilm_ray.cli import build_parser

    documented = " ".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    documented = re.sub(r"\s*\\\n\s*", " ", documented)
    jobs = {name: doc for name, doc in manifests().items() if doc["kind"] == "RayJob"}
    assert {shlex.split(d["spec"]["entrypoint"])[1] for d in jobs.values()} == {"jobs/preprocess.py", "jobs/pretrain.py"}
    for name, doc in jobs.items():
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] == "python" and (REPO / argv[1]).is_file(), name
        command = re.search(r'run_job\("(\w+)"', (REPO / argv[1]).read_text()).group(1)  # what the script runs
        args = build_parser().parse_args([command, *argv[2:]])  # the job's own argument parser takes them
        assert (REPO / args.config).is_file()
        assert f"-- python {' '.join(argv[1:4])}" in documented, f"{name}: not a documented `ray job submit` line"


def test_worker_groups_are_cluster_yamls_node_types_and_spot_ones_drain():
    from ray.scripts.scripts import drain_node

    types = _cluster_yaml()["available_node_types"]
    expected = {"cpu-spot": "cpu_spot", "v100-spot": "v100_spot"}
    seen = set()
    for name, doc in manifests().items():
        for group in cluster_specs(doc)["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            container = pod["containers"][0]
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            drain = shlex.split(command[-1].split("&&")[0])
            assert drain[:2] == ["ray", "drain-node"], (name, command)
            params = drain_node.make_context("drain-node", drain[2:]).params  # Ray's own CLI parses the flags
            assert params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
            assert pod["terminationGracePeriodSeconds"] > params["deadline_remaining_seconds"]
            if group["groupName"] not in expected:
                continue
            seen.add(group["groupName"])
            node = types[expected[group["groupName"]]]
            assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == node["node_config"]["InstanceType"]
            assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
            assert pod["nodeSelector"]["eks.amazonaws.com/capacityType"] == "SPOT"
            assert any(t["key"] == "spot" for t in pod["tolerations"])
            assert json.loads(json.loads(group["rayStartParams"]["resources"])) == node["resources"]
            assert group["maxReplicas"] == node["max_workers"] and pod["terminationGracePeriodSeconds"] >= 120
            gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert gpus == node["resources"].get("trainer", 0)  # one `trainer` per GPU, as on cluster.yaml
    assert seen == set(expected)


def test_every_pod_has_the_service_account_that_reaches_s3():
    """As cluster.yaml's worker profiles: a pod without the IRSA service account cannot read or write the
    bucket (node preparation, checkpoints, dumps), while the driver's checks on the head pass."""
    for name, doc in manifests().items():
        assert all(pod.get("serviceAccountName") == "kilm-ray" for _, pod in pods(doc)), name


def test_the_rayservice_runs_serve_deploy_yamls_application():
    from ray.serve.schema import ServeDeploySchema

    serve_deploy = yaml.safe_load((REPO / "configs" / "serve-deploy.yaml").read_text())
    (doc,) = [d for d in manifests().values() if d["kind"] == "RayService"]
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(config)
    assert config["http_options"] == serve_deploy["http_options"]
    assert config["proxy_location"] == serve_deploy["proxy_location"]
    (app,), (reference,) = config["applications"], serve_deploy["applications"]
    assert {k: v for k, v in app.items() if k != "runtime_env"} == {k: v for k, v in reference.items() if k != "runtime_env"}
    assert app["runtime_env"]["env_vars"] == reference["runtime_env"]["env_vars"]
    ports = {p["name"]: p["containerPort"] for c in [doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                                                      ["containers"][0]] for p in c["ports"]}
    assert ports["serve"] == serve_deploy["http_options"]["port"]
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["replicas"]
               for g in workers)
    assert gpus >= reference["args"]["serve.num_replicas"] * reference["args"]["serve.num_gpus"]


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_kept_schemas_say_where_they_come_from(kind):
    source = crd(kind)["source"]
    assert source["repository"] == "https://github.com/ray-project/kuberay" and source["tag"] == "v1.7.0"
    assert len(source["commit"]) == 40 and source["path"].endswith(f"ray.io_{CRDS[kind]}.yaml")
