"""The dependency ranges pyproject.toml declares are ones that work: kilm_ray on the lowest transformers stack
it allows and on a GPU image's (transformers 5.17), against the installed versions (slow: pip installs), and
the pieces that choose between transformers versions (fast)."""

import importlib.util
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest

from kilm_ray.model.generation import _model_cache_keyword, cache_keyword

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("dependency_floors", REPO / "scripts" / "dependency_floors.py")
floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floors)


def _specifiers() -> dict:
    from packaging.requirements import Requirement

    requirements = [Requirement(line) for line in floors._requirements()]
    return {r.name.lower().replace("-", "_"): r.specifier for r in requirements}


def test_cache_keyword_follows_the_signature():
    # transformers 5.24 and later: `cache` (past_key_values kept as a deprecated alias, so both are listed
    # where a decorator exposes it); 5.0 to 5.23: past_key_values only, and `cache=` vanished into **kwargs.
    assert cache_keyword(["input_ids", "cache", "use_cache", "kwargs"]) == "cache"
    assert cache_keyword(["input_ids", "past_key_values", "cache", "kwargs"]) == "cache"
    assert cache_keyword(["input_ids", "past_key_values", "use_cache", "kwargs"]) == "past_key_values"
    with pytest.raises(TypeError, match="neither cache nor past_key_values"):
        cache_keyword(["input_ids", "use_cache", "kwargs"])


def test_the_installed_bart_takes_and_returns_the_chosen_cache_name():
    from transformers import BartModel
    from transformers.modeling_outputs import Seq2SeqModelOutput

    keyword = _model_cache_keyword(BartModel)
    assert keyword in inspect.signature(BartModel.forward).parameters
    assert keyword in Seq2SeqModelOutput.__dataclass_fields__  # greedy_steps reads the output's field of that name
    major, minor = (int(x) for x in version("transformers").split(".")[:2])
    assert keyword == ("cache" if (major, minor) >= (5, 24) else "past_key_values")


def test_declared_ranges_hold_every_tested_version():
    specs = _specifiers()
    floor = floors.declared_floors()
    # torch's floor is the build the project installs and CI tests (a GPU image's older torch runs only
    # through bench/gpu_check's bundle, which the ranges do not govern).
    spec = re.search(r"TORCH_SPEC:-torch==([\w.]+)", (REPO / "scripts" / "install_torch.sh").read_text()).group(1)
    assert floor["torch"] == ".".join(spec.split(".")[:2]) and spec in specs["torch"]
    assert version("torch").split("+")[0] in specs["torch"]
    sets = floors.version_sets()
    assert set(sets["floors"]) == set(floors.STACK)
    for name in floors.STACK:
        assert sets["floors"][name] in specs[name], name  # the floor set is the declared lowest versions
        assert version(name) in specs[name], name  # the installed (newest tested) versions are allowed
    for name, pinned in sets["gpu-image"].items():
        assert pinned in specs[name], name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["floors", "gpu-image"])
def test_kilm_ray_on_the_lowest_and_a_gpu_image_transformers(name, shared_data, tmp_path_factory, reference_probe):
    """pip --no-deps --target the set's versions (about 20 MB of wheels), then tokenize, generate with
    kilm_ray's greedy steps (Serve's, evaluation's and the demo's path), beam search, score, run a training
    forward/backward and export/reload under them: the same tokens as Hugging Face's greedy and as the
    installed versions, the same log-probabilities, loss and gradient norm within rounding."""
    pins = floors.version_sets()[name]
    target = tmp_path_factory.mktemp(name)
    floors.install(pins, target)
    got = floors.probe(target, shared_data)
    assert floors.differences(got, reference_probe, pins) == []
    assert got["versions"]["transformers_file"].startswith(str(target))


@pytest.fixture(scope="module")
def reference_probe(shared_data):
    return floors.probe(None, shared_data)
