"""Every bad input a user can give: a clear message naming the problem and the fix, before any work,
and nothing already stored lost (issue 10). One tiny run is stored first; each bad input then runs
into the same results folder and must leave every stored byte as it was."""
from __future__ import annotations

import hashlib
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

import bench.store
from bench.config import CONF
from bench.data import Shapes
from bench.run import run
from bench.zoo import ResNet
from bench.zoo.sources import sha256

TINY = ["model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=96",
        "model.train.n_test=32", "dataset.n_samples=10", "dataset.size=32", "batch_size=4",
        "method=[saliency,random]", "metric=[pixel_flipping,pointing_game]", "metric.pixel_flipping.steps=4",
        "report=false"]


def _cfg(cache: Path, *extra: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"cache_dir={cache}", *extra])


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A results folder holding one complete tiny run (4 cells), and the model cache it trained."""
    root = tmp_path_factory.mktemp("bad_input")
    cache, out = root / "cache", root / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                            # on shared cores, intra-op threads stall
    manifest = run(_cfg(cache), out_dir=out)
    assert len(manifest["cells"]) == 4
    yield cache, out
    torch.set_num_threads(threads)


def _refused(stored, match: str, *overrides: str, cfg=None, out: Path | None = None) -> None:
    """Run with the bad input into the stored folder: ValueError matching `match`, every stored byte kept."""
    cache, stored_out = stored
    before = _snapshot(stored_out)
    # a run folder belongs to one configuration (the runner refuses another one's folder before anything else),
    # so a bad configuration runs into a fresh folder beside the stored run, which must keep every byte
    fresh = Path(tempfile.mkdtemp(dir=stored_out.parent, prefix="bad-"))
    with pytest.raises(ValueError, match=match):
        run(cfg if cfg is not None else _cfg(cache, *overrides), out_dir=out or fresh)
    assert _snapshot(stored_out) == before
    assert not (fresh / "manifest.json").exists()                  # a refused run commits nothing


# ---- options and parameters: each case is (overrides, the message it must give) -------------------
CONFIG_CASES = {
    "reduce": (["reduce=mean"], r"reduce must be one of \['sum', 'abs_sum', 'max_abs', 'l2'\], got 'mean'"),
    "batch_size_zero": (["batch_size=0"], r"batch_size must be a positive integer \(samples per batch\), got 0"),
    "batch_size_text": (["batch_size=four"], r"batch_size must be a positive integer .*got 'four'"),
    "seed_negative": (["seed=-1"], r"seed must be a non-negative integer, got -1"),
    "device_unknown": (["device=tpu"], r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    "cache_maps_not_bool": (["cache_maps=maybe"], r"cache_maps must be true or false, got 'maybe'"),
    "unavailable_metrics": (["unavailable_metrics=ignore"], r"unavailable_metrics must be 'error' or 'skip'"),
    "precision": (["precision=float64"], r"precision must be one of \['float32', 'bfloat16', 'float16'\], got "
                  r"'float64': float32 is exact"),
    "channels_last_not_bool": (["channels_last=yes"], r"channels_last must be true or false, got 'yes'"),
    "no_method": (["method=[]"], r"no method selected: pass method=\[name,...\] with names from conf/method/"),
    "negative_steps": (["metric.pixel_flipping.steps=-1"],
                       r"metric\.pixel_flipping \(with method saliency\): ValueError: steps must be between 1 and "
                       r"the number of pixels.*got -1.*conf/metric/pixel_flipping\.yaml"),
    "steps_not_an_integer": (["metric.pixel_flipping.steps=4.5"],
                             r"metric\.pixel_flipping \(with method saliency\): ValueError: steps must be an integer, "
                             r"got 4\.5 \(float\)"),
    "nan_baseline": (["metric.pixel_flipping.baseline=nan"],
                     r"metric\.pixel_flipping .*baseline must be a finite number .*got nan"),
    "unknown_baseline": (["metric.pixel_flipping.baseline=grey"],
                         r"metric\.pixel_flipping .*baseline must be .*got 'grey'"),
    "fraction_above_one": (["metric=[pixel_flipping,iou_at_threshold]", "metric.iou_at_threshold.fraction=1.5"],
                           r"metric\.iou_at_threshold .*fraction.*1\.5"),
    "layer_not_in_model": (["method=[saliency,grad_cam]", "method.grad_cam.layer=features.block9"],
                           r"method\.grad_cam: ValueError: grad_cam: layer 'features\.block9' is not a module of "
                           r"SmallCNN.*method\.grad_cam\.<key>="),
    "method_zero_steps": (["method=[integrated_gradients]", "method.integrated_gradients.steps=0"],
                          r"method\.integrated_gradients: .*steps"),
    "misspelt_parameter": (["+method.saliency.stpes=3"],
                           r"method\.saliency: unknown parameter\(s\) \['stpes'\] for saliency"),
    "target_not_allowed": (["method.saliency._target_=os.system"],
                           r"method\.saliency\._target_='os\.system' .* add yours to `allowed_targets`"),
    "target_missing": (["method.saliency._target_=methods.no_such_method"],
                       r"method\.saliency \(target 'methods\.no_such_method'\) cannot be created: .*no_such_method"),
    "n_samples_zero": (["dataset.n_samples=0"], r"dataset \(target 'bench\.data\.Shapes'\) cannot be created: "
                                                r"ValueError: n_samples must be an integer >= 1, got 0"),
    "unknown_split": (["dataset.split=validation"], r"dataset .*split must be one of \['test', 'train', 'val'\]"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_option_or_parameter_is_refused(stored, case):
    overrides, match = CONFIG_CASES[case]
    _refused(stored, match, *overrides)


def test_cuda_device_without_cuda_is_refused(stored):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _refused(stored, r"device='cuda' but CUDA is not available here: use device=auto or device=cpu", "device=cuda")


def test_unknown_method_name_lists_the_available_ones():
    """Hydra names the missing file but, for a list like method=[...], not the choices: the app adds them."""
    from bench.__main__ import unknown_choice

    with pytest.raises(ConfigCompositionException, match=r"Could not load 'method/saliencyy'"):
        _cfg(Path("unused"), "method=[saliencyy]")
    message = unknown_choice(["model=resnet", "method=[saliency,saliencyy]", "metric.pixel_flipping.steps=3"])
    assert message.startswith("method=saliencyy: no conf/method/saliencyy.yaml; available: centre, constant,")
    assert "integrated_gradients" in message and unknown_choice(["method=[saliency,random]", "-m"]) is None
    assert unknown_choice(["model=small_cnn,resnett"]).startswith("model=resnett: no conf/model/resnett.yaml")


def test_a_name_that_is_not_a_file_name_is_refused(stored):
    cfg = _cfg(stored[0])
    with open_dict(cfg):
        cfg.method["../escape"] = cfg.method.saliency                # e.g. a user YAML with this top key
    _refused(stored, r"method name '\.\./escape' cannot be used in a file name", cfg=cfg)


# ---- the data: every item is checked, by sample id, before the model is even loaded ---------------
def _patch_items(monkeypatch, change) -> None:
    original = Shapes.__getitem__

    def getitem(self, i):
        item = dict(original(self, i))
        change(int(i), item)
        return item

    monkeypatch.setattr(Shapes, "__getitem__", getitem)


def _nan(i, item):
    if i == 3:
        item["x"] = item["x"].clone()
        item["x"][1, 5, 7] = math.nan


def _inf(i, item):
    if i == 7:
        item["x"] = item["x"].clone()
        item["x"][0, 0, 0] = -math.inf


def _grey(i, item):
    if i == 5:
        item["x"] = item["x"][:1]


def _duplicate(i, item):
    if i == 6:
        item["sample_id"] = torch.tensor(2)


def _bad_target(i, item):
    if i == 4:
        item["target"] = torch.tensor(9)


def _uint8(i, item):
    item["x"] = (item["x"] * 0).to(torch.uint8)


def _float_id(i, item):
    if i == 1:
        item["sample_id"] = torch.tensor(1.5)


def _no_mask(i, item):
    del item["mask"]


DATA_CASES = {
    "nan": (_nan, r"sample_id\(s\) \[3\]: image contains NaN or Inf; fix or drop these samples"),
    "inf": (_inf, r"sample_id\(s\) \[7\]: image contains NaN or Inf"),
    "wrong_shape": (_grey, r"sample_id 5: image has shape \(1, 32, 32\), expected \(3, 32, 32\) like the dataset's"),
    "duplicate_id": (_duplicate, r"sample_id 2 occurs more than once; sample ids must be unique"),
    "target_not_a_class": (_bad_target, r"sample_id 4: target 9 is not a class of model small_cnn \(6 outputs\)"),
    "integer_image": (_uint8, r"sample_id 0: image x must be a float tensor \(C, H, W\), got \(3, 32, 32\) torch.uint8"),
    "float_sample_id": (_float_id, r"dataset item 1: sample_id must be an integer, got tensor\(1\.5"),
    "no_masks": (_no_mask, r"metric\.pointing_game needs \['mask'\], which dataset shapes does not provide \(it has no "
                           r"ground-truth masks\): drop it from metric=\[\.\.\.\] or set unavailable_metrics=skip"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_refused_by_sample_id(stored, monkeypatch, case):
    change, match = DATA_CASES[case]
    _patch_items(monkeypatch, change)
    _refused(stored, match, "metric.pixel_flipping.seed=1")          # new keys: nothing could be skipped


def test_mask_metric_is_skipped_with_a_warning_when_asked(stored, monkeypatch, tmp_path, caplog):
    _patch_items(monkeypatch, _no_mask)
    manifest = run(_cfg(stored[0], "unavailable_metrics=skip"), out_dir=tmp_path / "out")
    assert {c["metric"] for c in manifest["cells"]} == {"pixel_flipping"} and len(manifest["cells"]) == 2
    assert "metric.pointing_game needs ['mask']" in caplog.text and "skipped (unavailable_metrics=skip)" in caplog.text


# ---- files and folders -----------------------------------------------------------------------------
def test_results_folder_that_cannot_be_written_is_refused(stored, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _refused(stored, r"results folder '.*a_file/out' is not writable \(.*\); set results_dir to a folder you can "
                     r"write to", out=blocker / "out")


def test_full_disk_is_refused_before_the_expensive_part(stored, monkeypatch):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(bench.store.shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    _refused(stored, r"has 1\.0 MiB free, this run needs about \d+\.\d MiB: free space or set results_dir",
             "metric.pixel_flipping.seed=1")


def _checkpoint(stored, tmp_path) -> tuple[Path, Path]:
    """A copy of the trained model cache in its own folder, to spoil."""
    [ckpt] = sorted(stored[0].glob("small_cnn-*.pt"))
    cache = tmp_path / "cache"
    cache.mkdir()
    return cache, Path(shutil.copy(ckpt, cache))


class Payload:
    """Any class: unpickling it would run code of the file's choosing."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("spoil", ["corrupt", "arbitrary_object", "other_architecture"])
def test_bad_checkpoint_is_refused(stored, tmp_path, spoil, capsys):
    cache, path = _checkpoint(stored, tmp_path)
    if spoil == "corrupt":
        path.write_bytes(path.read_bytes()[:100])
    elif spoil == "arbitrary_object":
        checkpoint = torch.load(path, weights_only=True)
        torch.save({**checkpoint, "info": Payload()}, path)
    else:
        torch.save({"state_dict": ResNet(width=4).state_dict(), "info": {}}, path)
    # its sha256 recorded as if the zoo had written it (a file whose digest does not match is retrained with a
    # CacheIntegrityWarning instead, tests/bench/test_zoo.py): the file itself must be refused, not unpickled
    path.with_name(path.name + ".sha256").write_text(sha256(path), encoding="ascii")
    _refused(stored, rf"(?s)cached checkpoint {path} cannot be loaded \(.*\); delete it to retrain",
             f"cache_dir={cache}")
    assert "this must never run" not in capsys.readouterr().out


# ---- the metrics' own arguments (issue 21): every faithfulness and localization metric, called directly ----
import metrics  # noqa: E402
from metrics import (attribution_localisation, deletion, energy_pointing_game, faithfulness_correlation,  # noqa: E402
                     infidelity, insertion, iou_at_threshold, localization_auc, pixel_flipping, pointing_game,
                     relevance_mass_accuracy, relevance_rank_accuracy, road)
from metrics.localization import top_k_intersection  # noqa: E402

PERTURBATION = {"pixel_flipping": pixel_flipping, "deletion": deletion, "insertion": insertion, "road": road}
MODEL_METRICS = {**PERTURBATION, "faithfulness_correlation": faithfulness_correlation, "infidelity": infidelity}
LOCALIZATION = {f.__name__: f for f in (pointing_game, energy_pointing_game, relevance_mass_accuracy,
                                        relevance_rank_accuracy, localization_auc, top_k_intersection,
                                        attribution_localisation, iou_at_threshold)}
NOT_AN_INT = r"must be an integer .*got"

# (metric, keyword arguments, the message): wrong types and NaNs used to give raw torch errors, NaN scores, or
# silent truncation (steps=True was 1 step, steps=4.5 a fractional group size)
METRIC_ARGUMENT_CASES = [
    *[(name, {"steps": bad}, rf"steps must be an integer, got {re.escape(repr(bad))} \({type(bad).__name__}\)")
      for name in PERTURBATION for bad in (4.5, "8", True, 8.0)],
    ("pixel_flipping", {"patch": 2.0}, r"patch must be an integer, got 2\.0 \(float\)"),
    ("pixel_flipping", {"max_fraction": math.nan}, r"max_fraction must be a finite number \(the share of units"),
    ("pixel_flipping", {"max_fraction": 0.0}, r"max_fraction must be in \(0, 1\] .*got 0\.0"),
    ("pixel_flipping", {"max_fraction": 0.05, "steps": 5},          # a budget of ceil(0.05 * 64) = 4 pixels
     r"steps must be between 1 and the pixels in max_fraction=0\.05 \(4\), got 5"),
    ("pixel_flipping", {"baseline": math.nan}, r"baseline must be a finite number \(a constant in the model's input"),
    ("deletion", {"baseline": math.inf}, r"baseline must be a finite number"),
    ("insertion", {"baseline": torch.full((1, 3, 1, 1), math.nan)}, r"baseline contains NaN or Inf"),
    ("faithfulness_correlation", {"baseline": math.nan}, r"baseline must be a finite number"),
    ("road", {"noise": math.nan}, r"noise must be a finite number \(the imputation noise's standard deviation\)"),
    ("road", {"noise": "0.1"}, r"noise must be a number .*got '0\.1' \(str\)"),
    ("road", {"iterations": 2.5}, r"iterations must be an integer \(conjugate-gradient steps"),
    ("road", {"iterations": -1}, r"iterations must be >= 0"),
    ("infidelity", {"noise_std": math.nan}, r"noise_std must be a finite number"),
    ("infidelity", {"noise_std": math.inf}, r"noise_std must be a finite number"),
    ("infidelity", {"perturbations": 4.5}, r"perturbations must be an integer \(noise draws per sample\)"),
    ("infidelity", {"normalize": "yes"}, r"normalize must be true or false, got 'yes'"),
    ("faithfulness_correlation", {"subsets": "8"}, r"subsets must be an integer \(random subsets"),
    ("faithfulness_correlation", {"fraction": math.nan}, r"fraction must be a finite number \(the share of pixels"),
    *[(name, {"seed": bad}, r"seed must be (an integer|>= 0), got") for name in MODEL_METRICS for bad in (1.5, -1)],
    *[(name, {"output": "probability"}, r"output must be 'logit' or 'softmax', got 'probability'")
      for name in MODEL_METRICS],
    ("pointing_game", {"tolerance": math.nan}, r"tolerance must be a finite number \(pixels\), got nan"),
    ("pointing_game", {"tolerance": "15"}, r"tolerance must be a number \(pixels\), got '15' \(str\)"),
    ("energy_pointing_game", {"box": "no"}, r"box must be true or false, got 'no'"),
    ("top_k_intersection", {"k": math.nan}, r"k as a float is a fraction of the pixels and must lie in \(0, 1\]"),
    ("top_k_intersection", {"concept_influence": 1}, r"concept_influence must be true or false, got 1"),
    ("iou_at_threshold", {"fraction": math.nan}, r"fraction as a float is a fraction of the pixels"),
    *[(name, {"sign": "abs"}, r"sign must be 'signed', 'positive' or 'absolute', got 'abs'") for name in LOCALIZATION],
    *[(name, {"chunk_size": bad}, r"chunk_size must be") for name in
      ("pointing_game", "relevance_rank_accuracy", "localization_auc", "top_k_intersection", "iou_at_threshold")
      for bad in (0, 2.5)],
]


def _call(name, kwargs, model, x, target, attribution=None):
    """One metric on the tiny batch (a seeded map, a 3x3 mask), with `kwargs` over a few cheap defaults."""
    a = torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(0)) \
        if attribution is None else attribution
    if name in LOCALIZATION:
        m = torch.zeros_like(a, dtype=torch.bool)
        m[:, 2:5, 2:5] = True
        return LOCALIZATION[name](a, m, **kwargs)
    return MODEL_METRICS[name](model, x, target, a, **{**({"steps": 4} if name in PERTURBATION else {}), **kwargs})


@pytest.mark.parametrize("case", range(len(METRIC_ARGUMENT_CASES)),
                         ids=[f"{n}-{next(iter(k))}={k[next(iter(k))]!r}" for n, k, _ in METRIC_ARGUMENT_CASES])
def test_bad_metric_argument_is_refused(tiny_cnn, batch, case):
    name, kwargs, match = METRIC_ARGUMENT_CASES[case]
    x, target = batch
    with pytest.raises(ValueError, match=match):
        _call(name, kwargs, tiny_cnn, x, target)


@pytest.mark.parametrize("name", sorted(MODEL_METRICS))
def test_bad_target_is_refused_by_every_model_metric(tiny_cnn, batch, name):
    """A float target, or a class the model does not have (tiny_cnn has 3), used to give a raw gather error
    (or, on CUDA, a device-side assert); an int32 target scores as int64 does."""
    x, target = batch
    with pytest.raises(ValueError, match=r"target must be an integer tensor of class indices, shape \(5,\), got a "
                                         r"torch\.float32 tensor"):
        _call(name, {}, tiny_cnn, x, target.float())
    for bad, shown in ((torch.tensor([0, 1, 3, 0, 1]), r"\[3\]"), (torch.tensor([0, -1, 2, 0, 1]), r"\[-1\]")):
        with pytest.raises(ValueError, match=rf"target must hold class indices in 0\.\.2 \(the model has 3 outputs\), "
                                             rf"got {shown}"):
            _call(name, {}, tiny_cnn, x, bad)
    with pytest.raises(ValueError, match=r"target must have shape \(5,\), got \(5, 1\)"):
        _call(name, {}, tiny_cnn, x, target[:, None])
    ok, as_int32 = _call(name, {}, tiny_cnn, x, target), _call(name, {}, tiny_cnn, x, target.int())
    for key, v in ok.scores.items():
        torch.testing.assert_close(as_int32.scores[key], v, equal_nan=True)


@pytest.mark.parametrize("name", sorted(MODEL_METRICS) + sorted(LOCALIZATION))
def test_map_with_a_nan_is_refused_by_every_metric(tiny_cnn, batch, name):
    x, target = batch
    a = torch.rand(5, 8, 8)
    a[3, 4, 4] = math.nan
    with pytest.raises(ValueError, match=r"attribution contains NaN or Inf; a map must be finite"):
        _call(name, {}, tiny_cnn, x, target, attribution=a)


def test_every_metric_of_the_families_is_covered():
    assert set(metrics.faithfulness.__all__) == set(MODEL_METRICS)
    assert set(metrics.localization.__all__) - {"class_mean"} == set(LOCALIZATION)
