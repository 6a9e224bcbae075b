"""Unsupported cells vs misconfigurations (issue 18, "Every run completes"), progress bars and per-cell time.

A tiny ViT (trained by the suite in seconds) is a model that LRP and DeepLIFT cannot run on (a
position embedding and layer norms have no rule); a user metric (plugged in through
`allowed_targets`) refuses models with layer norms by raising metrics.checks.Unsupported. Those
cells are recorded as unsupported with the reason; saliency x pixel flipping is scored. A bad value
still stops the run before any work.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch import nn

import bench.run
import methods
from bench.config import CONF
from bench.probe import unsupported_reason
from bench.report import write_report
from bench.results import UNSUPPORTED_COLUMNS, load
from bench.run import run
from bench.tables import cost
from metrics.checks import Unsupported

N = 12
TINY_VIT = ["model=vit", "model.net.dim=16", "model.net.depth=1", "model.net.heads=2", "model.net.stem_width=4",
            "model.net.tokens=16", "model.train.epochs=1", "model.train.n_train=96", "model.train.n_test=32",
            "model.train.batch_size=32", f"dataset.n_samples={N}", "dataset.size=32", "batch_size=4",
            "method=[saliency,lrp_epsilon,deeplift]", "metric=[pixel_flipping]", "metric.pixel_flipping.steps=4",
            "report=false", "gallery=false", "allowed_targets=[userunsupported.]"]
USER = '''
from torch import nn
from metrics import MetricResult
from metrics.checks import Unsupported


def cnn_only(model, attribution):
    """Mean of the map; refuses a model with layer norms (a stand-in for a metric that needs conv layers)."""
    if any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        raise Unsupported(f"cnn_only cannot run on {type(model).__name__}: it has layer norms")
    return MetricResult(scores={"mean": attribution.flatten(1).mean(1)}, higher_is_better={"mean": True})
'''


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The model cache; the user metric's module importable; single-threaded torch (shared cores)."""
    root = tmp_path_factory.mktemp("unsupported")
    (root / "userunsupported.py").write_text(USER)
    sys.path.insert(0, str(root))
    importlib.import_module("userunsupported")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root / "cache"
    torch.set_num_threads(threads)
    sys.path.remove(str(root))
    sys.modules.pop("userunsupported", None)


def _cfg(cache: Path, *extra: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY_VIT, f"cache_dir={cache}", *extra])
    with open_dict(cfg):
        cfg.metric["cnn_only"] = {"_target_": "userunsupported.cnn_only", "_partial_": True}
    return cfg


class _Bars:
    """A stand-in for tqdm in bench.run that records each bar's arguments, updates and postfixes."""

    def __init__(self) -> None:
        self.bars: list[dict] = []

    def __call__(self, **kwargs):
        bar = {**kwargs, "updates": 0, "postfix": []}
        self.bars.append(bar)
        recorder = self

        class Bar:
            def update(self, n: int = 1) -> None:
                bar["updates"] += n

            def set_postfix_str(self, s: str, refresh: bool = True) -> None:
                bar["postfix"].append(s)

            def close(self) -> None:
                recorder.closed = True
        return Bar()


LRP_WHY = "lrp_epsilon cannot run on ViT: layer 'pos' (PositionEmbedding) has no LRP rule here"
DEEPLIFT_WHY = "deeplift cannot run on ViT: layer 'blocks.0.norm1' (LayerNorm) has no DeepLIFT rule here"
METRIC_WHY = "cnn_only cannot run on ViT: it has layer norms"


def test_unsupported_cells_are_recorded_and_every_other_cell_scored(cache, tmp_path, monkeypatch):
    bars = _Bars()
    monkeypatch.setattr(bench.run, "tqdm", bars)
    out = tmp_path / "out"
    manifest = run(_cfg(cache), out_dir=out)

    expected = [{"method": "deeplift", "metric": "cnn_only", "reason": DEEPLIFT_WHY},
                {"method": "deeplift", "metric": "pixel_flipping", "reason": DEEPLIFT_WHY},
                {"method": "lrp_epsilon", "metric": "cnn_only", "reason": LRP_WHY},
                {"method": "lrp_epsilon", "metric": "pixel_flipping", "reason": LRP_WHY},
                {"method": "saliency", "metric": "cnn_only", "reason": METRIC_WHY}]
    assert manifest["status"] == "complete" and manifest["unsupported"] == expected
    assert [(c["method"], c["metric"]) for c in manifest["cells"]] == [("saliency", "pixel_flipping")]
    assert manifest["failures"] == []                                   # no sample failed: cells could not run

    results = load(out)
    scored = results.scores[results.scores.score == "aopc"]
    assert sorted(scored.sample_id) == list(range(N)) and scored.value.notna().all()
    u = results.unsupported
    assert list(u.columns) == UNSUPPORTED_COLUMNS
    assert u[["method", "metric", "reason"]].to_dict("records") == expected
    assert set(u.dataset) == {"shapes"} and set(u.model) == {"vit"} and set(u.run_id) == {manifest["run_id"]}
    f = results.failures[results.failures.stage == "unsupported"]
    assert f[["method", "metric", "error"]].values.tolist() == [[e["method"], e["metric"], e["reason"]] for e in expected]
    assert f.sample_id.isna().all() and len(results.failures) == len(expected)

    # per-cell time: the scored cell only; cost() shows it as kind "cell"
    timings = manifest["timings"]
    assert timings["cell/saliency/pixel_flipping"] > 0
    assert not any(k.startswith(("cell/lrp", "cell/deeplift", "method/lrp", "method/deeplift")) for k in timings)
    assert timings["cell/saliency/pixel_flipping"] == timings["metric/pixel_flipping"]
    c = cost(results)
    assert c[c.kind == "cell"][["name", "seconds"]].values.tolist() == [["saliency/pixel_flipping",
                                                                         timings["cell/saliency/pixel_flipping"]]]

    # one bar for the one method with a cell to compute: its three batches, the metric as postfix
    assert [(b["desc"], b["total"], b["updates"], b["disable"]) for b in bars.bars] == [("saliency", 3, 3, None)]
    assert bars.bars[0]["postfix"].count("pixel_flipping") == 3

    # the report: a note under the Markdown leaderboard, failures.csv with the cells (no failed samples)
    md = (write_report(out, gallery=False) / "leaderboard.md").read_text()
    assert f"Unsupported on shapes / vit, not scored: deeplift × cnn_only, pixel_flipping: {DEEPLIFT_WHY}" in md
    assert f"Unsupported on shapes / vit, not scored: saliency × cnn_only: {METRIC_WHY}" in md
    assert "failed samples" not in md
    assert pd.read_csv(out / "report" / "failures.csv").stage.tolist() == ["unsupported"] * len(expected)

    # a rerun skips the stored cell and probes the unsupported ones again (cheap), with the same verdicts
    again = run(_cfg(cache, "progress=false"), out_dir=out)
    assert again["skipped"] == 1 and again["unsupported"] == expected
    assert not any(k.startswith("cell/") for k in again["timings"]) and not bars.bars[1:]   # nothing to score


@pytest.mark.parametrize("override, match", [
    ("method.lrp_epsilon.epsilon=small", r"method\.lrp_epsilon: ValueError: lrp_epsilon: epsilon must be a finite"),
    ("metric.pixel_flipping.steps=4.5", r"metric\.pixel_flipping \(with method saliency\): .*steps must be an integer"),
])
def test_a_misconfiguration_still_stops_before_any_work(cache, tmp_path, override, match):
    """A bad value of an unsupported method is still the user's to fix; so is a metric's."""
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        run(_cfg(cache, override), out_dir=out)
    assert not list(out.rglob("*.parquet")) and not (out / "manifest.json").exists()


def test_progress_false_turns_the_bars_off(cache, tmp_path, monkeypatch):
    bars = _Bars()
    monkeypatch.setattr(bench.run, "tqdm", bars)
    run(_cfg(cache, "progress=false", "method=[saliency]", "metric=[pixel_flipping]"), out_dir=tmp_path / "quiet")
    assert [(b["desc"], b["disable"]) for b in bars.bars] == [("saliency", True)]
    with pytest.raises(ValueError, match="progress must be true or false, got 'yes'"):
        run(_cfg(cache, "progress=yes"), out_dir=tmp_path / "bad")


def test_unsupported_reason_is_narrow():
    """Unsupported (what methods._common.cannot_run returns) is a reason; plain errors and faults are not."""
    why = unsupported_reason(methods._common.cannot_run("m", nn.Linear(2, 2), "no rule"))
    assert why == "m cannot run on Linear: no rule" and isinstance(methods._common.cannot_run("m", None, ""), Unsupported)
    assert unsupported_reason(ValueError("steps must be an integer")) is None
    assert unsupported_reason(RuntimeError("CUDA out of memory")) is None


def test_lrp_on_a_torchvision_resnet_is_gradient_x_input_and_leaves_the_model_as_it_was(batch_norms_drawn):
    """zennit's ResNetCanonizer merged the batch norms twice: its undo failed on bias-free convs and left
    canonizer_sum modules behind. With the block canonizers alone, LRP-epsilon (eps -> 0) on a ReLU ResNet
    is gradient x input (Ancona et al. 2018)."""
    from bench.zoo import torchvision_model
    torch.manual_seed(0)
    model = torchvision_model(4, arch="resnet18").eval()
    batch_norms_drawn(model)                                                # non-trivial batch norms to merge
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    gxi = methods.gradient_x_input(model, x, target)
    for name in ("lrp_alpha1_beta0", "lrp_epsilon"):                    # the first one failed on exit before
        r = getattr(methods, name)(model, x, target, **({"epsilon": 1e-9} if name == "lrp_epsilon" else {}))
        assert r.shape == x.shape and torch.isfinite(r).all()
        state = model.state_dict()
        assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
        assert not any("canonizer" in n for n, _ in model.named_modules())
    torch.testing.assert_close(r, gxi, atol=1e-3 * gxi.abs().max().item(), rtol=1e-3)
