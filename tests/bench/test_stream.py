"""The runner's edges (issue 19): each item decoded once per run, the run context, the metrics' YAML metadata."""
from __future__ import annotations

import importlib
import sys
import tempfile
from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_dir

from bench.config import CONF
from bench.data import Shapes
from bench.data.stream import Batches, stream
from bench.provenance import metric_meta
from bench.run import run

N = 10
USER = '''
from collections import Counter
from bench.data import Shapes

READS = {}                                             # n_samples -> Counter of the indices read


class Counting(Shapes):
    """shapes, counting every item read (`dataset[i]`: where a dataset of files decodes one)."""

    def __getitem__(self, i):
        READS.setdefault(self.n_samples, Counter())[int(i)] += 1
        return super().__getitem__(i)


class Bare:
    """Items only: no split, n_samples, num_classes, mean, std or tensors()."""

    def __init__(self, *, name, **options):
        self.name, self._data = name, Shapes(**options)

    def __len__(self):
        return len(self._data)

    def __getitem__(self, i):
        return self._data[i]
'''
TINY = ["model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=96", "model.train.n_test=32",
        f"dataset.n_samples={N}", "dataset.size=32", "batch_size=4", "report=false",
        "gallery=false"]


class _Counting(Shapes):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reads = Counter()

    def __getitem__(self, i):
        self.reads[int(i)] += 1
        return super().__getitem__(i)


def test_batches_decode_each_item_once_and_give_the_same_tensors_every_pass(tmp_path):
    ds = _Counting(n_samples=N, size=16)
    expected = list(stream(Shapes(n_samples=N, size=16), 4, torch.device("cpu")))
    with Batches(ds, 4, spool_dir=tmp_path) as batches:
        for _ in range(3):
            got = list(batches.stream(torch.device("cpu")))
            assert [s for s, _ in got] == [0, 4, 8] == [s for s, _ in expected]
            assert all(b.keys() == e.keys() and all(torch.equal(b[k], e[k]) for k in b) for (_, b), (_, e) in
                       zip(got, expected))
        head = batches.head(6, torch.device("cpu"))                            # across two batches
        first = next(stream(Shapes(n_samples=N, size=16), 6, torch.device("cpu")))[1]
        assert all(torch.equal(head[k], first[k]) for k in first)
        assert ds.reads == Counter(range(N)) and batches.reads == 1          # one decode per item in all
        assert len(list(tmp_path.iterdir())) == 1
    assert not list(tmp_path.iterdir())                                       # the spool goes with the run


def test_a_pass_stopped_early_keeps_no_spool_and_the_next_reads_again(tmp_path):
    ds = _Counting(n_samples=N, size=16)
    batches = Batches(ds, 4, spool_dir=tmp_path)
    next(iter(batches.stream(torch.device("cpu"))))
    batches.stream(torch.device("cpu")).close()
    assert not list(tmp_path.iterdir())
    assert len(list(batches.stream(torch.device("cpu")))) == 3 and batches.reads == 2
    assert len(list(batches.stream(torch.device("cpu")))) == 3 and batches.reads == 2     # spooled by then
    batches.close()


def test_a_spool_that_cannot_be_written_falls_back_to_reading_the_dataset(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ds = _Counting(n_samples=N, size=16)
    batches = Batches(ds, 4, spool_dir=blocker / "spool")
    passes = [list(batches.stream(torch.device("cpu"))) for _ in range(2)]
    assert "cannot create a folder to keep decoded batches in" in caplog.text
    assert all(torch.equal(a["x"], b["x"]) for (_, a), (_, b) in zip(*passes))
    assert ds.reads == Counter({i: 2 for i in range(N)}) and batches.reads == 2


def test_a_dataset_over_the_spool_budget_is_read_again_not_spooled(tmp_path, monkeypatch, caplog):
    """ImageNet's validation split decoded is 30 GB of float32: a spool over its budget is never written."""
    import bench.data.stream as streaming
    item = 3 * 16 * 16 * 4 + 8 + 8 + 16 * 16                       # x float32, target, sample_id, mask bytes
    monkeypatch.setattr(streaming, "SPOOL_BYTES", N * item - 1)
    caplog.set_level("INFO", logger="bench.data.stream")
    ds = _Counting(n_samples=N, size=16)
    with Batches(ds, 4, spool_dir=tmp_path) as batches:
        passes = [list(batches.stream(torch.device("cpu"))) for _ in range(2)]
        assert not list(tmp_path.iterdir()) and "over the spool's budget" in caplog.text
    assert all(torch.equal(a["x"], b["x"]) for (_, a), (_, b) in zip(*passes))
    assert ds.reads == Counter({i: 2 for i in range(N)}) and batches.reads == 2
    monkeypatch.setattr(streaming, "SPOOL_BYTES", 3 * 4 * item)     # three batches of 4: it fits
    with Batches(_Counting(n_samples=N, size=16), 4, spool_dir=tmp_path) as batches:
        [list(batches.stream(torch.device("cpu"))) for _ in range(2)]
        assert batches.reads == 1


@pytest.fixture
def user(tmp_path, monkeypatch):
    (tmp_path / "usercount.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))          # where the spool goes
    (tmp_path / "tmp").mkdir()
    torch.set_num_threads(1)
    yield importlib.import_module("usercount")
    sys.modules.pop("usercount", None)


def _cfg(tmp_path, *extra):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}", *extra])


def test_a_run_decodes_each_item_once(tmp_path, user):
    """3 methods x 2 metrics: the runner read every item 2 + 3 times (scan, model check, each method) plus
    the probe's PROBE items; now once, and the spool is removed."""
    cfg = _cfg(tmp_path, "dataset._target_=usercount.Counting", "allowed_targets=[usercount.]",
               "method=[saliency,random,edge]", "metric=[pixel_flipping,pointing_game]", "metric.pixel_flipping.steps=4")
    manifest = run(cfg, out_dir=tmp_path / "out")
    assert len(manifest["cells"]) == 6 and manifest["status"] == "complete"
    assert user.READS[N] == Counter(range(N))
    assert not list((tmp_path / "tmp").iterdir())


def test_metric_metadata_is_recorded_checked_and_outside_the_keys(tmp_path):
    cfg = _cfg(tmp_path, "method=[random]", "metric=[pointing_game]")
    plain = run(cfg, out_dir=tmp_path / "runs" / "a")
    meta = ["++metric.pointing_game._sanity_=[hit]", "++metric.pointing_game._staged_=true"]
    described = run(_cfg(tmp_path, "method=[random]", "metric=[pointing_game]", *meta), out_dir=tmp_path / "runs" / "b")
    assert plain["metrics"] == {"pointing_game": metric_meta("pointing_game", cfg.metric.pointing_game)}
    assert described["metrics"] == {"pointing_game": {"sanity": ["hit"], "staged": True, "headline": None}}
    assert [c["key"] for c in described["cells"]] == [c["key"] for c in plain["cells"]] and described["skipped"] == 1
    assert described["identity"]["config"] == plain["identity"]["config"]
    assert "_sanity_" not in described["config"]["metric"]["pointing_game"]
    for bad, match in [("++metric.pointing_game._sanity_=hit", r"metric.pointing_game._sanity_ must be a list of score "
                                                               r"names, e.g. \[spearman\], got 'hit'"),
                       ("++metric.pointing_game._sanity_=[1]", r"_sanity_ must be a list of score names.*got \[1\]"),
                       ("++metric.pointing_game._staged_=1", r"metric.pointing_game._staged_ must be true or false, "
                                                             r"got 1: fix conf/metric/pointing_game.yaml")]:
        with pytest.raises(ValueError, match=match):
            run(_cfg(tmp_path, "method=[random]", "metric=[pointing_game]", bad), out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_a_dataset_lacking_a_member_of_the_contract_is_refused(tmp_path, user):
    with pytest.raises(ValueError, match=r"dataset 'usercount.Bare' lacks \['split', 'n_samples', 'num_classes', 'mean', "
                                         r"'std', 'tensors'\]: a dataset provides what bench.data.contract.BenchDataset"):
        run(_cfg(tmp_path, "method=[random]", "metric=[pointing_game]", "dataset._target_=usercount.Bare",
                 "allowed_targets=[usercount.]"), out_dir=tmp_path / "out")
