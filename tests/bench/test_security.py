"""Code runs only where the user named it; names stay file names; the cache is writable before any work.

`_target_`s are resolved to the object they name (bench.checks.check_targets): a module or function
imported into an allowed package is refused by what it is. The sentinel is a pickle that creates a
marker file when it is loaded: every refused run must leave no marker.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.checks import check_cache_dir, check_name, check_names, check_targets
from bench.config import CONF
from bench.run import run

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=24",
        "model.train.n_test=8", "dataset.n_samples=4", "batch_size=4", "method=[saliency]", "metric=[pointing_game]"]


class _Marker:
    """Unpickling this calls open(path, "w"): the file appears only if the pickle is loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def sentinel(tmp_path) -> tuple[Path, Path]:
    """(pickle file, marker): the marker exists once the pickle has been loaded by anything."""
    marker = tmp_path / "PWNED"
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(_Marker(marker)))
    assert not marker.exists()
    return payload, marker


def _cfg(*overrides: str, conf: Path = CONF):
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _refused(cfg, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        run(cfg, out_dir=tmp_path / "out")


# ---- `_target_`s resolve to objects -----------------------------------------------------------------
def _load(payload: Path) -> dict[str, list[str]]:
    """Overrides that, before the check resolved objects, loaded `payload` inside the run."""
    return {
        "torch.load": ["+dataset.evil._target_=bench.zoo.sources.torch.load", f"+dataset.evil.f={payload}",
                       "+dataset.evil.weights_only=false"],
        "pandas.read_pickle": ["+metric.pointing_game.x._target_=bench.report.pd.read_pickle",
                               f"+metric.pointing_game.x.filepath_or_buffer={payload}"],
        "methods.cam.torch.load": ["+method.saliency.x._target_=methods.cam.torch.load",
                                   f"+method.saliency.x.f={payload}", "+method.saliency.x.weights_only=false"],
        "model.net nested": ["+model.net.extra._target_=bench.zoo.train.torch.load", f"+model.net.extra.f={payload}",
                             "+model.net.extra.weights_only=false"],
    }


@pytest.mark.parametrize("case", ["torch.load", "pandas.read_pickle", "methods.cam.torch.load", "model.net nested"])
def test_a_function_imported_into_an_allowed_module_never_runs(tmp_path, sentinel, case):
    payload, marker = sentinel
    overrides = _load(payload)[case]
    key, target = overrides[0].lstrip("+").split("=")
    module = {"torch.load": "torch", "pandas.read_pickle": "pandas"}.get(case, "torch")
    _refused(_cfg(*TINY, f"cache_dir={tmp_path / 'cache'}", *overrides),
             rf"^{key.replace('.', '[.]')}='{target}' is not an allowed target: {target.rsplit('.', 1)[0]} is the "
             rf"module {module}, which lies outside the allowed packages.*add yours to `allowed_targets`", tmp_path)
    assert not marker.exists()
    assert not (tmp_path / "cache").exists()                               # refused before any work


ALIASES = {   # target -> what the message says it is
    "bench.calls.os.system": r"bench.calls.os is the module os,",
    "bench.data.stream.operator.attrgetter": r"bench.data.stream.operator is the module operator,",
    "bench.checks.instantiate": r"bench.checks.instantiate is instantiate from hydra._internal.instantiate.*, imported "
                                r"into bench.checks but defined outside the allowed packages",
    "bench.zoo.nets.nn.Module": r"bench.zoo.nets.nn is the module torch.nn,",
    "builtins.eval": r"it is outside the allowed packages",
    "os.system": r"it is outside the allowed packages",
    "methods.saliency.__globals__": r"it goes through a dunder attribute",
    "bench.zoo.SmallCNN.register_forward_hook": r"bench.zoo.SmallCNN.register_forward_hook is .* from "
                                                r"torch.nn.modules.module",
    "bench.zoo": r"it is a module, not a class or function",
    "torchvision.models._api.load_state_dict_from_url": r"torchvision.models._api.load_state_dict_from_url is "
                                                        r"load_state_dict_from_url from torch.hub, imported into",
}


@pytest.mark.parametrize("target", sorted(ALIASES))
def test_aliases_and_builtins_are_refused_by_what_they_are(target):
    with pytest.raises(ValueError, match=rf"^method.saliency._target_='{target}' is not an allowed target: "
                                         rf"{ALIASES[target]}"):
        check_targets(_cfg("method=[saliency]", f"method.saliency._target_={target}"))


def test_targets_anywhere_in_the_config_are_checked():
    """In lists, at the top level, and behind an interpolation that builds a node (oc.create)."""
    with pytest.raises(ValueError, match=r"^method.saliency.layers.1._target_='bench.calls.os.system'"):
        check_targets(_cfg("method=[saliency]", "+method.saliency.layers=[{a:1},{_target_:bench.calls.os.system}]"))
    with pytest.raises(ValueError, match=r"^evil._target_='bench.provenance.subprocess.run'"):
        check_targets(_cfg("+evil._target_=bench.provenance.subprocess.run"))
    with initialize_config_dir(str(CONF), version_base="1.3"):           # Hydra's node: its callbacks are user code
        hydra_cfg = compose("config", overrides=["+hydra.callbacks.evil._target_=bench.calls.os.system"],
                            return_hydra_config=True)
    with pytest.raises(ValueError, match=r"^hydra.callbacks.evil._target_='bench.calls.os.system'"):
        check_targets(hydra_cfg)
    del hydra_cfg.hydra.callbacks.evil
    check_targets(hydra_cfg)                                              # Hydra's own plugins and ReportCallback
    cfg = _cfg("method=[saliency]")
    OmegaConf.set_struct(cfg, False)
    cfg.method.saliency.x = "${oc.create:'{_target_: bench.calls.os.system}'}"
    with pytest.raises(ValueError, match=r"^method.saliency.x._target_='bench.calls.os.system'"):
        check_targets(cfg)
    cfg.method.saliency.x = {"_target_": "${oc.env:NO_SUCH_VARIABLE_HERE}"}
    with pytest.raises(ValueError, match=r"^method.saliency.x._target_ cannot be resolved .*plain dotted path"):
        check_targets(cfg)


def test_the_suites_own_targets_and_unknown_names_pass_to_instantiate():
    check_targets(_cfg("model=torchvision", "method=[saliency,grad_cam]"))
    check_targets(_cfg("model=checkpoint"))                               # nested module._target_ in the suite
    from bench.checks import ALLOWED_TARGETS, resolve_target
    import torchvision.models
    assert resolve_target("torchvision.models.resnet18", ALLOWED_TARGETS) is torchvision.models.resnet18
    assert resolve_target("torchvision.models.get_model", ALLOWED_TARGETS) is torchvision.models.get_model
    check_targets(_cfg("method=[saliency]", "method.saliency._target_=methods.no_such_method"))   # instantiate says so
    check_targets(_cfg("method=[saliency]", "method.saliency._target_=methods.gradient.torch.load"))
    # ... and there it fails as Hydra's lookup does: `methods.gradient` is the function, it has no `torch`
    from hydra._internal.utils import _locate
    with pytest.raises(ImportError):
        _locate("methods.gradient.torch.load")


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    """A user's package that defines Net and re-exports pickle.loads and os.system."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from os import system\nfrom pickle import loads\n\n\ndef net(num_classes):\n"
                                     "    return num_classes\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg"
    sys.modules.pop("userpkg", None)


def test_allowed_targets_let_in_the_packages_own_objects_only(userpkg):
    allow = "allowed_targets=[userpkg.]"
    check_targets(_cfg("method=[saliency]", "method.saliency._target_=userpkg.net", allow))
    for name, origin in (("loads", "_pickle"), ("system", "posix")):
        with pytest.raises(ValueError, match=rf"^method.saliency._target_='userpkg.{name}' is not an allowed target: "
                                             rf"userpkg.{name} is {name} from {origin}, imported into userpkg"):
            check_targets(_cfg("method=[saliency]", f"method.saliency._target_=userpkg.{name}", allow))
    # a prefix ends at a package boundary; a listed name without its dot means the same package
    with pytest.raises(ValueError, match=r"'userpkg_evil.x' is not an allowed target: it is outside"):
        check_targets(_cfg("method=[saliency]", "method.saliency._target_=userpkg_evil.x", "allowed_targets=[userpkg]"))
    check_targets(_cfg("method=[saliency]", "method.saliency._target_=userpkg.net", "allowed_targets=[userpkg]"))
    with pytest.raises(ValueError, match=r"^allowed_targets must be a list of package prefixes such as \[mypkg.\], "
                                         r"got 'userpkg'"):
        check_targets(_cfg("method=[saliency]", "allowed_targets=userpkg"))


def test_a_preset_cannot_smuggle_a_target(tmp_path, sentinel):
    """conf/experiment/*.yaml (@package _global_) can set any key: its targets are checked like overrides."""
    payload, marker = sentinel
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "evil.yaml").write_text(
        "# @package _global_\ndataset:\n  evil:\n    _target_: bench.zoo.sources.torch.load\n"
        f"    f: {payload}\n    weights_only: false\n")
    cfg = _cfg(*TINY, f"cache_dir={tmp_path / 'cache'}", "experiment=evil", conf=conf)
    _refused(cfg, r"^dataset.evil._target_='bench.zoo.sources.torch.load' is not an allowed target", tmp_path)
    assert not marker.exists()


def test_a_yaml_on_the_search_path_is_checked_like_the_suites_own(tmp_path, sentinel, monkeypatch):
    """A user's folder (hydra.searchpath) adds names, never code: its targets pass only under allowed_targets,
    which lets in the package's own objects, not what it imports (tests/plugin_example imports torch)."""
    payload, marker = sentinel
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugin_example"))
    own = tmp_path / "own"
    (own / "method").mkdir(parents=True)
    (own / "method" / "evil.yaml").write_text(
        f"evil:\n  _target_: my_saliency.torch.load\n  f: {payload}\n  weights_only: false\n")
    (own / "method" / "nested.yaml").write_text(
        f"nested:\n  _target_: my_saliency.gradient_squared\n  _partial_: true\n  scale:\n"
        f"    _target_: methods.cam.torch.load\n    f: {payload}\n    weights_only: false\n")
    search = f"hydra.searchpath=[file://{own}]"
    for method, target, reason in (("evil", "my_saliency.torch.load", "my_saliency.torch is the module torch"),
                                   ("nested", "methods.cam.torch.load", "methods.cam.torch is the module torch")):
        key = "method.evil._target_" if method == "evil" else "method.nested.scale._target_"
        _refused(_cfg(*TINY[:-2], f"method=[{method}]", "metric=[pointing_game]", search,
                      "allowed_targets=[my_saliency.]", f"cache_dir={tmp_path / 'cache'}"),
                 rf"^{key}='{target}' is not an allowed target: {reason}", tmp_path)
    _refused(_cfg(*TINY[:-2], "method=[gradient_squared]", "metric=[pointing_game]",
                  f"hydra.searchpath=[file://{ROOT / 'tests' / 'plugin_example' / 'conf'}]",
                  f"cache_dir={tmp_path / 'cache'}"),
             r"^method.gradient_squared._target_='my_saliency.gradient_squared' is not an allowed target: it is "
             r"outside the allowed packages", tmp_path)
    assert not marker.exists() and not (tmp_path / "cache").exists()


def test_a_search_path_folder_cannot_hand_hydra_code(tmp_path):
    """Hydra builds its callbacks and logging itself, before the run's checks: a user's folder may not set
    them (a `_global_` preset, a `@package hydra...` file, a hydra/ group folder); plain settings pass."""
    from bench.__main__ import hydra_target

    marker = tmp_path / "PWNED"
    own = tmp_path / "own"
    (own / "experiment").mkdir(parents=True)
    search = f"hydra.searchpath=[file://{own}]"
    callback = f"evil:\n  _target_: builtins.open\n  file: {marker}\n  mode: w\n"
    cases = {
        "experiment/evil.yaml": ("# @package _global_\nhydra:\n  callbacks:\n    " + callback.replace("\n", "\n    "),
                                 "hydra.callbacks"),
        "method/evil.yaml": ("# @package hydra.callbacks\n" + callback, "hydra.callbacks"),
        "experiment/logs.yaml": ("# @package _global_\nhydra:\n  job_logging:\n    handlers:\n      h:\n"
                                 "        '()': os.system\n", "hydra.job_logging"),
    }
    for name, (text, key) in cases.items():
        (own / name).parent.mkdir(exist_ok=True)
        (own / name).write_text(text)
        assert hydra_target([search, "experiment=evil"]).startswith(f"{own / name} sets {key}")
        (own / name).unlink()
    (own / "experiment" / "mine.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n"
                                                  "      model: tiny_net\n")
    assert hydra_target([search, "experiment=mine"]) is None and hydra_target(["experiment=quick"]) is None
    (own / "hydra" / "job_logging").mkdir(parents=True)
    assert hydra_target([search]).startswith(f"{own / 'hydra'}: a search-path folder may add dataset, model")
    shutil.rmtree(own / "hydra")
    (own / "experiment" / "evil.yaml").write_text(cases["experiment/evil.yaml"][0])
    proc = subprocess.run([sys.executable, "-m", "bench", search, "experiment=evil", "hydra.mode=RUN",
                           f"results_dir={tmp_path / 'results'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SALIENCY_BENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {own / 'experiment' / 'evil.yaml'} sets "
                                                           "hydra.callbacks")
    assert not marker.exists() and not (tmp_path / "results").exists()


def test_the_cli_exits_with_the_message_and_runs_nothing(tmp_path, sentinel):
    payload, marker = sentinel
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SALIENCY_BENCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "hydra.mode=RUN", f"results_dir={tmp_path / 'results'}", "report=false",
         *TINY, *_load(payload)["pandas.read_pickle"]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: metric.pointing_game.x._target_='bench.report.pd.read_pickle' is not an allowed target: " \
           "bench.report.pd is the module pandas" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists() and not (tmp_path / "cache").exists()


# ---- names become paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["x/../../../../out/evil", "../escaped", "..", ".hidden", "a\\b", "", "a b",
                                  "x" * 101])
def test_check_name_refuses_what_is_not_one_safe_path_component(name):
    with pytest.raises(ValueError, match=r"^dataset name .* cannot be used in a file name: .*one path component"):
        check_name("dataset", name)


def test_check_name_accepts_plain_names():
    for name in ("shapes", "small_cnn", "torchvision_resnet18", "vit-b.16+x", "x" * 100, 7):
        check_name("model", name)
    with pytest.raises(ValueError, match=r"^model name None cannot be used"):
        check_name("model", None)


@pytest.mark.parametrize("override, group", [("dataset.name=x/../../../../out/evil", "dataset"),
                                             ("model.name=../escaped", "model")])
def test_run_refuses_a_name_that_leaves_its_folder(tmp_path, override, group):
    value = override.split("=", 1)[1]
    _refused(_cfg(*TINY, f"cache_dir={tmp_path / 'cache'}", override),
             rf"^{group} name '{value.replace('.', '[.]')}' cannot be used in a file name", tmp_path)
    assert not list(tmp_path.rglob("*evil*")) and not list(tmp_path.rglob("*escaped*"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_the_zoo_refuses_a_model_name_that_leaves_the_cache(tmp_path, monkeypatch):
    import bench.zoo.train as train
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before the name was checked"))
    cfg = _cfg(*TINY, "model.name=../escaped")
    with pytest.raises(ValueError, match=r"^model name '\.\./escaped' cannot be used in a file name"):
        train.load_model(cfg.model, cfg.dataset, cache_dir=tmp_path / "cache")
    assert not list(tmp_path.rglob("*escaped*"))


# ---- model names follow what runs ---------------------------------------------------------------------
def test_an_arch_entry_run_with_another_arch_needs_its_own_name():
    """`model=torchvision model.net.arch=vgg11` would label vgg11's rows `torchvision`, like resnet18's."""
    with pytest.raises(ValueError, match=r"^model.name='torchvision' is the zoo entry conf/model/torchvision.yaml, but "
                                         r"this run's network differs from it: model.net.arch='vgg11' "
                                         r"\(conf/model/torchvision.yaml: 'resnet18'\).*"
                                         r"e.g. model.name=torchvision_vgg11"):
        check_names(_cfg("model=torchvision", "model.net.arch=vgg11"))
    check_names(_cfg("model=torchvision", "model.net.arch=vgg11", "model.name=torchvision_vgg11"))
    check_names(_cfg("model=timm", "model.net.arch=vit_tiny_patch16_224", "model.name=timm_vit_tiny_patch16_224"))


@pytest.mark.parametrize("overrides, message", [
    (["model=torchvision", "model.name=vgg11"],
     r"^model.name='vgg11' does not name the network that runs: model.net.arch='resnet18' picks it.*contains "
     r"'resnet18'"),
    (["model=timm", "model.name=torchvision_resnet50", "model.net.arch=resnet18"],
     r"^model.name='torchvision_resnet50' does not name the network that runs: model.net.arch='resnet18'"),
    (["model=small_cnn", "model.name=resnet"],
     r"^model.name='resnet' is the zoo entry conf/model/resnet.yaml, but this run's network differs from it: "
     r"model.net._target_='bench.zoo.SmallCNN' \(conf/model/resnet.yaml: 'bench.zoo.ResNet'\)"),
    (["model=vgg", "model.name=vgg_silu"],
     r"^model.name='vgg_silu' is the zoo entry .*: model.net.activation='relu' \(conf/model/vgg_silu.yaml: 'silu'\)"),
    (["model=vgg_silu", "model.net.activation=gelu"], r"model.net.activation='gelu' \(conf/model/vgg_silu.yaml"),
])
def test_a_model_name_that_names_another_network_is_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_names(_cfg(*overrides))


def test_the_run_refuses_a_mislabelled_model_before_building_it(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.models, "get_model", lambda *a, **k: pytest.fail("built before the check"))
    _refused(_cfg(*TINY[5:], "model=torchvision", "model.name=vgg11", f"cache_dir={tmp_path / 'cache'}"),
             r"^model.name='vgg11' does not name the network that runs", tmp_path)


@pytest.mark.parametrize("entry", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_zoo_entry_and_free_labels_pass(entry):
    check_names(_cfg(f"model={entry}"))
    check_names(_cfg(f"model={entry}", "model.name=my_label_resnet18"))   # a label naming no other entry
    if entry == "small_cnn":
        check_names(_cfg("model=small_cnn", "model.net.width=4"))        # sizes may differ from the entry


# ---- cache_dir ------------------------------------------------------------------------------------------
def test_an_unwritable_cache_dir_is_refused_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    cache = blocker / "cache"
    _refused(_cfg(*TINY, f"cache_dir={cache}"),
             rf"^cache_dir '{cache}' is not writable \(.*\); trained zoo models are kept there: set cache_dir "
             r"\(or SALIENCY_BENCH_CACHE\) to a folder you can write to", tmp_path)
    import bench.zoo.train as train
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before cache_dir was checked"))
    cfg = _cfg(*TINY)
    with pytest.raises(ValueError, match=rf"^cache_dir '{cache}' is not writable"):
        train.load_model(cfg.model, cfg.dataset, cache_dir=cache)
    assert check_cache_dir(tmp_path / "new" / "cache") == tmp_path / "new" / "cache"   # created when missing
    assert (tmp_path / "new" / "cache").is_dir() and not list((tmp_path / "new" / "cache").iterdir())
