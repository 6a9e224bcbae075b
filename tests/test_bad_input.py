"""Every bad input a user can give: a clear message naming the problem and the fix, before any work,
and nothing already stored lost (issue 10). One tiny run is stored first; each bad input then runs
into the same results folder and must leave every stored byte as it was."""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

import bench.store
from bench.data import Shapes
from bench.run import run
from bench.zoo import ResNet

CONF = Path(__file__).resolve().parents[1] / "conf"
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
    with pytest.raises(ValueError, match=match):
        run(cfg if cfg is not None else _cfg(cache, *overrides), out_dir=out or stored_out)
    assert _snapshot(stored_out) == before


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
    "unknown_baseline": (["metric.pixel_flipping.baseline=grey"],
                         r"metric\.pixel_flipping .*baseline must be .*got 'grey'"),
    "fraction_above_one": (["metric=[pixel_flipping,iou_at_threshold]", "metric.iou_at_threshold.fraction=1.5"],
                           r"metric\.iou_at_threshold .*fraction.*1\.5"),
    "layer_not_in_model": (["method=[saliency,grad_cam]", "method.grad_cam.layer=features.block9"],
                           r"method\.grad_cam: ValueError: grad_cam cannot run on SmallCNN: layer 'features\.block9' "
                           r"is not a module of it.*method\.grad_cam\.<key>="),
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
    _refused(stored, rf"(?s)cached checkpoint {path} cannot be loaded \(.*\); delete it to retrain",
             f"cache_dir={cache}")
    assert "this must never run" not in capsys.readouterr().out
