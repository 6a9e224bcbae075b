"""Faults during a run (issue 10) and the runner's keys, map cache and determinism (issue 9).

A user package (written to a temporary folder, plugged in through `allowed_targets` as any
user's own code would be) provides a method that fails on some samples in three ways, a
metric that fails on some samples, and a metric whose chunk runs out of memory once.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from bench import store
from bench.config import CONF
from bench.data import Shapes
from bench.report import load
from bench.run import PROBE, run
from metrics.batching import ChunkRetryWarning, chunked

N = 12                                                   # targets are sample_id % 6
TINY = ["model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=96",
        "model.train.n_test=32", f"dataset.n_samples={N}", "dataset.size=32", "batch_size=4",
        "method=[saliency]", "metric=[pixel_flipping]", "metric.pixel_flipping.steps=4", "report=false",
        "allowed_targets=[userfaults.]"]
USER = '''
import torch
from metrics import MetricResult
from metrics.batching import chunked

CALLS = {"samples": 0, "stop_at": None, "deterministic": []}


def faulty(model, x, target, *, faults: bool = True):
    """|x|; with faults: raises on class 2, NaN for class 4, a wrong shape for any batch holding class 5."""
    CALLS["samples"] += len(x)
    CALLS["deterministic"].append(torch.are_deterministic_algorithms_enabled())
    if CALLS["stop_at"] is not None and CALLS["samples"] >= CALLS["stop_at"]:
        raise KeyboardInterrupt                                  # as Ctrl-C would, mid-run
    if faults and (target == 2).any():
        raise RuntimeError("injected fault on class 2")
    a = x.abs()
    if faults:
        a = torch.where((target == 4).view(-1, 1, 1, 1), torch.nan, a)
        if (target == 5).any():
            return a[:, :, 1:]
    return a


def mean_map(attribution, target, *, fail_on: int = -1):
    """Mean of the map; raises for any batch holding class `fail_on`."""
    if (target == fail_on).any():
        raise RuntimeError(f"injected metric fault on class {fail_on}")
    return MetricResult(scores={"mean": attribution.flatten(1).mean(1)}, higher_is_better={"mean": True})


def oom_once(attribution, *, chunk_size: int = 4):
    """Mean of the map, through chunked(); any chunk of more than 2 samples runs out of memory."""
    def fn(i):
        if len(i) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return attribution.flatten(1).mean(1)[i]
    return MetricResult(scores={"mean": chunked(fn, len(attribution), chunk_size, device=attribution.device)},
                        higher_is_better={"mean": True})
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(cache folder, user module); single-threaded torch: on shared cores intra-op threads stall."""
    root = tmp_path_factory.mktemp("faults")
    (root / "userfaults.py").write_text(USER)
    sys.path.insert(0, str(root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    user = importlib.import_module("userfaults")
    yield root / "cache", user
    torch.set_num_threads(threads)
    sys.path.remove(str(root))
    sys.modules.pop("userfaults", None)


def _cfg(cache: Path, *extra: str, methods: dict | None = None, metrics: dict | None = None):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"cache_dir={cache}", *extra])
    with open_dict(cfg):
        for group, nodes in (("method", methods or {}), ("metric", metrics or {})):
            if group not in cfg:                                            # method=[] leaves no key at all
                cfg[group] = {}
            for name, (target, options) in nodes.items():
                cfg[group][name] = {"_target_": f"userfaults.{target}", "_partial_": True, **options}
    return cfg


CLEAN = {"clean": ("faulty", {"faults": False})}
FAULTY = {"faulty": ("faulty", {})}
MEAN = {"mean_map": ("mean_map", {"fail_on": 3})}


def _one(root: Path, name: str) -> Path:
    """The one `name` (manifest.json, cells, failures.parquet) of the one run below `root`, wherever the run's
    folder is."""
    found = sorted(root.rglob(name))
    assert len(found) == 1, f"expected one {name} below {root}, found {found}"
    return found[0]


def _scores(root: Path) -> pd.DataFrame:
    s = load(root).scores.drop(columns="run_id")
    return s.sort_values(["method", "metric", "score", "sample_id"]).reset_index(drop=True)


def _expected_mean(ids: list[int]) -> torch.Tensor:
    """The mean of the abs_sum map of |x|, straight from the dataset."""
    x = Shapes(n_samples=N, size=32).tensors()["x"]
    return x.abs().sum(dim=1).flatten(1).mean(dim=1).double()[ids]


def test_faulty_samples_are_recorded_and_every_other_sample_scored(env, tmp_path):
    cache, user = env
    out = tmp_path / "out"
    cfg = _cfg(cache, "method=[]", methods={**CLEAN, **FAULTY}, metrics=MEAN)
    manifest = run(cfg, out_dir=out)
    s = _scores(out)

    def ids(method, metric):
        return sorted(s[(s.method == method) & (s.metric == metric)].sample_id.unique().tolist())

    assert ids("clean", "pixel_flipping") == list(range(N))
    assert ids("clean", "mean_map") == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]           # the metric fails on class 3
    assert ids("faulty", "pixel_flipping") == [0, 1, 3, 6, 7, 9]                # the method fails on 2, 4, 5 (+6)
    assert ids("faulty", "mean_map") == [0, 1, 6, 7]
    # the samples that were scored got exactly the scores they get without any fault in their batch
    both = s[s.metric == "pixel_flipping"].pivot_table(index=["score", "sample_id"], columns="method", values="value")
    both = both.dropna()
    assert len(both) and (both["faulty"] == both["clean"]).all()
    mean = s[(s.metric == "mean_map") & (s.method == "clean")].sort_values("sample_id")
    torch.testing.assert_close(torch.tensor(mean.value.to_numpy()), _expected_mean(mean.sample_id.tolist()))

    # the failures table: one row per failed sample and cell, with the reason
    f = pd.read_parquet(_one(out, "failures.parquet"))
    method_failures = f[(f.method == "faulty") & (f.stage == "method")]
    assert sorted(method_failures[method_failures.metric == "pixel_flipping"].sample_id) == [2, 4, 5, 8, 10, 11]
    reasons = dict(zip(method_failures.sample_id, method_failures.error))
    assert reasons[2] == reasons[8] == "RuntimeError: injected fault on class 2"
    assert reasons[4] == reasons[10] == "ValueError: returned NaN or Inf"
    assert reasons[5] == reasons[11] == "ValueError: returned shape (1, 3, 31, 32), expected (1, 3, 32, 32)"
    metric_failures = f[f.stage == "metric"]
    assert sorted(zip(metric_failures.method, metric_failures.sample_id)) == [("clean", 3), ("clean", 9),
                                                                              ("faulty", 3), ("faulty", 9)]
    summary = {(e["method"], e["metric"], e["error"]): e["sample_ids"] for e in manifest["failures"]}
    assert summary[("faulty", None, "RuntimeError: injected fault on class 2")] == [2, 8]
    assert summary[("clean", "mean_map", "RuntimeError: injected metric fault on class 3")] == [3, 9]
    assert len(manifest["cells"]) == 4 and manifest["status"] == "complete"

    # a rerun skips every cell, calls no method, and still reports the same failures
    calls = user.CALLS["samples"]
    again = run(cfg, out_dir=out)
    assert again["skipped"] == 4 and user.CALLS["samples"] == calls and again["failures"] == manifest["failures"]


def test_out_of_memory_in_a_chunk_is_retried_once_and_recorded(env, tmp_path):
    cache, _ = env
    manifest = run(_cfg(cache, "method=[]", methods=CLEAN, metrics={"oom": ("oom_once", {})}), out_dir=tmp_path / "o")
    assert [r["batch_start"] for r in manifest["retries"]] == [0, 4, 8]
    assert manifest["retries"][0] == {"method": "clean", "metric": "oom", "batch_start": 0,
                                      "message": "out of memory at chunk_size=4; retried with chunk_size=2"}
    s = _scores(tmp_path / "o")
    torch.testing.assert_close(torch.tensor(s[s.metric == "oom"].value.to_numpy()), _expected_mean(list(range(N))))


def test_chunked_retries_only_out_of_memory_and_only_once():
    seen = []

    def fn(i, limit=3):
        seen.append(len(i))
        if len(i) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return i * 10

    with pytest.warns(ChunkRetryWarning, match="out of memory at chunk_size=8; retried with chunk_size=4"):
        with pytest.raises(torch.cuda.OutOfMemoryError):                        # 4 > 3: a second OOM is raised
            chunked(fn, 20, 8, device=torch.device("cpu"))
    with pytest.warns(ChunkRetryWarning):
        out = chunked(lambda i: fn(i, limit=4), 10, 8, device=torch.device("cpu"))
    assert out.tolist() == [10 * i for i in range(10)] and seen[-3:] == [4, 4, 2]   # smaller chunks after
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="not memory"):                  # other errors are not retried
            chunked(lambda i: (_ for _ in ()).throw(RuntimeError("not memory")), 5, 2, device=torch.device("cpu"))


def test_ctrl_c_keeps_completed_cells_and_the_next_run_resumes(env, tmp_path):
    cache, user = env
    cfg = _cfg(cache, metrics={"mean_map": ("mean_map", {})}, methods=CLEAN)          # saliency first, then clean
    whole = run(cfg, out_dir=tmp_path / "serial" / "whole")   # not beside `out`: no cell copied
    out = tmp_path / "out"
    user.CALLS["stop_at"] = user.CALLS["samples"] + PROBE + 4 + 1    # the probe, clean's first batch, then Ctrl-C
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cfg, out_dir=out)
    finally:
        user.CALLS["stop_at"] = None
    manifest = pd.read_json(_one(out, "manifest.json"), typ="series")
    assert manifest["status"] == "interrupted" and {c["method"] for c in manifest["cells"]} == {"saliency"}
    assert not list(out.rglob("*.part")) and len(list(_one(out, "cells").glob("*.scores.parquet"))) == 2
    resumed = run(cfg, out_dir=out)
    assert resumed["skipped"] == 2 and resumed["status"] == "complete" and len(resumed["cells"]) == 4
    assert _scores(out).equals(_scores(tmp_path / "serial")) and len(whole["cells"]) == 4


def test_changing_one_method_parameter_recomputes_only_its_cells(env, tmp_path):
    """A changed configuration is a new run in its own folder beside the old one; the cells it shares with the
    old run (same key) are copied, verified, not recomputed, and the old run's cells are untouched."""
    cache, _ = env
    old, changed = tmp_path / "old", tmp_path / "changed"
    run(_cfg(cache, "method=[saliency,random]", "metric=[pixel_flipping,pointing_game]"), out_dir=old)
    before = {p.name: p.stat().st_mtime_ns for p in _one(old, "cells").glob("*.scores.parquet")}
    manifest = run(_cfg(cache, "method=[saliency,random]", "metric=[pixel_flipping,pointing_game]",
                        "method.random.seed=1"), out_dir=changed)
    assert {p.name: p.stat().st_mtime_ns for p in _one(old, "cells").glob("*.scores.parquet")} == before
    after = {p.name for p in _one(changed, "cells").glob("*.scores.parquet")}
    shared, new = after & set(before), after - set(before)
    assert {n.split("__")[0] for n in shared} == {"saliency"} and len(shared) == 2
    assert {n.split("__")[0] for n in new} == {"random"} and len(new) == 2 and manifest["skipped"] == 2
    s_old, s_new = _scores(old), _scores(changed)
    assert s_new[s_new.method == "saliency"].reset_index(drop=True).equals(
        s_old[s_old.method == "saliency"].reset_index(drop=True))


def test_map_cache_lets_a_new_metric_reuse_the_maps(env, tmp_path):
    cache, user = env
    out = tmp_path / "runs" / "first"
    run(_cfg(cache, "method=[]", "cache_maps=true", methods=CLEAN), out_dir=out)
    maps = sorted((tmp_path / "runs" / "maps").rglob("*.pt"))               # shared by the run folders beside it
    assert len(maps) == 3 and torch.load(maps[0], weights_only=True)["maps"].shape == (4, 3, 32, 32)   # raw
    calls = user.CALLS["samples"]
    out = tmp_path / "runs" / "second"                                      # another configuration: its own folder
    manifest = run(_cfg(cache, "method=[]", "cache_maps=true", methods=CLEAN, metrics={"mean_map": ("mean_map", {})}),
                   out_dir=out)
    assert user.CALLS["samples"] - calls == PROBE                          # only the probe: no map recomputed
    assert manifest["skipped"] == 1 and "method/clean" not in manifest["timings"]
    s = _scores(out)
    mean = s[s.metric == "mean_map"].sort_values("sample_id")
    torch.testing.assert_close(torch.tensor(mean.value.to_numpy()), _expected_mean(list(range(N))))


def test_same_config_gives_identical_scores_and_deterministic_switch(env, tmp_path):
    cache, user = env
    cfg = _cfg(cache, "method=[saliency,random]", "metric=[pixel_flipping,pointing_game]")
    run(cfg, out_dir=tmp_path / "a")
    run(cfg, out_dir=tmp_path / "b")
    a, b = _scores(tmp_path / "a"), _scores(tmp_path / "b")
    assert len(a) > 4 * N and a.equals(b)                                   # bit-identical, NaN where NaN
    user.CALLS["deterministic"].clear()
    manifest = run(_cfg(cache, "method=[]", "deterministic=true", methods=CLEAN), out_dir=tmp_path / "d")
    assert manifest["deterministic"] is True and user.CALLS["deterministic"] and all(user.CALLS["deterministic"])
    assert not torch.are_deterministic_algorithms_enabled()                 # restored after the run


# ---- issue 21: stored cells are verified before reuse; a full disk keeps the manifest ------------
def test_a_damaged_stored_cell_is_named_and_recomputed(env, tmp_path, caplog):
    """A truncated scores file was taken as stored ("4 of 4 already stored") and the run then failed with
    "Parquet magic bytes not found" naming no file; a cell whose curves file was deleted counted as
    complete without curves."""
    cache, _ = env
    cfg = _cfg(cache, metrics={"mean_map": ("mean_map", {})}, methods=CLEAN)
    out = tmp_path / "out"
    run(cfg, out_dir=out)
    before, curves_before = _scores(out), load(out).curves
    cells = _one(out, "cells")
    truncated = next(cells.glob("clean__pixel_flipping__*.scores.parquet"))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    no_curves = next(cells.glob("saliency__pixel_flipping__*.curves.parquet"))
    no_curves.unlink()
    with caplog.at_level("WARNING", logger="bench.store"):
        again = run(cfg, out_dir=out)
    assert f"stored cell {truncated} is not whole (unreadable: Parquet magic bytes not found" in caplog.text
    assert f"stored cell {no_curves.with_name(no_curves.name.replace('curves', 'scores'))} is not whole " \
           f"({no_curves.name} is missing or unreadable)" in caplog.text
    assert again["skipped"] == 2 and again["status"] == "complete" and len(again["cells"]) == 4
    assert _scores(out).equals(before) and no_curves.exists()
    assert load(out).curves.sort_values(["method", "sample_id", "step"], ignore_index=True).equals(
        curves_before.sort_values(["method", "sample_id", "step"], ignore_index=True))


def test_a_full_disk_keeps_the_manifest_of_the_completed_cells(env, tmp_path, monkeypatch):
    """A disk that filled mid-run ended with a raw OSError and no manifest."""
    cache, _ = env
    cfg = _cfg(cache, metrics={"mean_map": ("mean_map", {})}, methods=CLEAN)      # saliency, then clean
    whole = tmp_path / "serial" / "whole"                     # not beside `out`: its cells are not copied
    run(cfg, out_dir=whole)
    append, calls = store.CellWriter.append, []

    def full_disk(self, result, sample_id):
        calls.append(self.keys["method"])
        if self.keys["method"] == "clean":                    # saliency's cells are committed by now
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._part("scores")))
        return append(self, result, sample_id)

    out = tmp_path / "out"
    monkeypatch.setattr(store.CellWriter, "append", full_disk)
    with pytest.raises(ValueError) as raised:
        run(cfg, out_dir=out)
    monkeypatch.setattr(store.CellWriter, "append", append)
    manifest_path = _one(out, "manifest.json")
    message = str(raised.value)
    assert message.startswith(f"results folder {str(manifest_path.parent)!r}: the run stopped on ")
    assert "clean__" in message and ": the disk is full (OSError: [Errno 28] No space left on device: " in message
    assert f"2 of 4 cells are stored and listed in {manifest_path} (status 'failed')" in message
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "failed" and "the disk is full" in manifest["error"]
    assert sorted((c["method"], c["metric"]) for c in manifest["cells"]) == [("saliency", "mean_map"),
                                                                            ("saliency", "pixel_flipping")]
    assert not list(out.rglob("*.part")) and calls.count("saliency") == 2 * 3          # 3 batches x 2 metrics
    resumed = run(cfg, out_dir=out)
    assert resumed["skipped"] == 2 and resumed["status"] == "complete" and "error" not in resumed
    assert _scores(out).equals(_scores(whole))

