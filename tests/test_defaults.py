"""The Python API's defaults are the YAML defaults: for every conf/method and conf/metric YAML, each key's
value equals the signature default of the function its `_target_` names, so calling a method or a metric
from Python gives the numbers of a run (the YAML is what runs). Deliberate exceptions are listed below, and
`seed: null`, which a run derives from its own seed (bench.config.derive_seeds; bench.api does the same)."""
from __future__ import annotations

import importlib
import inspect
import pytest
from omegaconf import OmegaConf

import metrics
from bench.config import CONF

# (group, yaml, key): why the YAML's value is not the function's default
EXCEPTIONS = {
    ("method", "gradient_shap", "noise"): "a preset: expected_gradients with input noise is GradientSHAP "
                                          "(Lundberg & Lee 2017); the function's default, noise 0, is expected "
                                          "gradients (conf/method/expected_gradients.yaml)",
    ("metric", "selectivity", "steps"): "a preset: pixel_flipping with Montavon et al. 2018's one patch per step",
    ("metric", "selectivity", "patch"): "a preset: pixel_flipping with Montavon et al. 2018's 4 x 4 patches",
    ("metric", "selectivity", "baseline"): "a preset: pixel_flipping with Quantus' Selectivity baseline (black)",
    ("metric", "data_randomization", "retrain"): "read by the runner, not by the function: it trains the "
                                                 "label-randomized model that the function takes as an argument",
}
PARAMS = [(group, path.stem) for group in ("method", "metric") for path in sorted((CONF / group).glob("*.yaml"))]


def _node(group: str, name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"), resolve=False)
    assert list(cfg) == [name], f"conf/{group}/{name}.yaml: the top key must be the file's stem"
    return cfg[name]


def _function(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _same(value: object, default: object) -> bool:
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(default, list):
        default = tuple(default)
    return value == default and isinstance(value, bool) == isinstance(default, bool)


@pytest.mark.parametrize("group, name", PARAMS, ids=[f"{g}/{n}" for g, n in PARAMS])
def test_yaml_values_are_the_signature_defaults(group, name):
    node = _node(group, name)
    params = inspect.signature(_function(node["_target_"])).parameters
    differ = []
    for key, value in node.items():
        if key.startswith("_"):
            continue
        assert key in params and params[key].kind is inspect.Parameter.KEYWORD_ONLY, \
            f"conf/{group}/{name}.yaml: {key} is not a keyword-only option of {node['_target_']}"
        default = params[key].default
        assert default is not inspect.Parameter.empty, f"{node['_target_']}: option {key} has no default"
        if key == "seed" and value is None:                    # derived from the run seed (bench.config.derive_seeds)
            assert isinstance(default, int) and not isinstance(default, bool), \
                f"{node['_target_']}: seed needs an integer default for calls from Python, got {default!r}"
            continue
        if not _same(value, default) and (group, name, key) not in EXCEPTIONS:
            differ.append(f"{key}: YAML {value!r}, function {default!r}")
    assert not differ, f"conf/{group}/{name}.yaml differs from {node['_target_']}'s defaults: {'; '.join(differ)}"


def test_exceptions_are_still_exceptions():
    """Each listed exception still differs (else it is stale and must go)."""
    for group, name, key in EXCEPTIONS:
        node = _node(group, name)
        default = inspect.signature(_function(node["_target_"])).parameters[key].default
        assert not _same(node[key], default), f"conf/{group}/{name}.yaml: {key} now equals the default; drop it"


def test_to_map_defaults_to_the_runs_reduction():
    """metrics.to_map(a) makes the map a default run ranks and locates (conf/config.yaml's reduce)."""
    reduce = OmegaConf.load(CONF / "config.yaml").reduce
    assert inspect.signature(metrics.to_map).parameters["reduce"].default == reduce


@pytest.mark.parametrize("group", ["method", "metric"])
def test_every_seed_follows_the_run_seed(group):
    """No shipped method or metric pins its seed: each one's draws change with the run's `seed`."""
    pinned = [name for g, name in PARAMS if g == group and _node(g, name).get("seed", None) is not None]
    assert not pinned, f"conf/{group}/{pinned}.yaml pin seed: set `seed: null` (derived from the run seed)"
