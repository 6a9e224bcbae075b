"""Seeds follow the run seed (issue 18): bench.config.derive_seeds, the runner and bench.api."""
from __future__ import annotations

import hashlib

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench import api
from bench.config import CONF, derive_seeds, derived_seed
from bench.run import run

TINY = ["model=small_cnn", "model.net.width=4", "model.train.epochs=1", "model.train.n_train=96",
        "model.train.n_test=32", "dataset.n_samples=8", "dataset.size=32", "batch_size=4", "report=false",
        "gallery=false", "method=[saliency,smoothgrad]", "method.smoothgrad.samples=4", "metric=[pixel_flipping]",
        "metric.pixel_flipping.steps=4"]


def _cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_derived_seed_is_the_documented_hash():
    """sha256 of "<run seed>/<group>/<name>", first 4 bytes big-endian, halved: [0, 2**31)."""
    assert derived_seed(0, "method", "smoothgrad") == int(hashlib.sha256(b"0/method/smoothgrad").hexdigest()[:8], 16) // 2
    assert derived_seed(0, "method", "smoothgrad") == 1394849346                        # stable across releases
    seeds = {derived_seed(s, g, n) for s in range(50) for g in ("method", "metric") for n in ("random", "mprt")}
    assert len(seeds) == 200 and all(0 <= s < 2**31 for s in seeds)
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            derived_seed(bad, "method", "random")


def test_derive_seeds_fills_nulls_keeps_pins_and_leaves_data_and_models_alone():
    cfg = _cfg("seed=7", "method=[smoothgrad,saliency,random]", "metric=[mprt,pointing_game]", "method.random.seed=3")
    out = derive_seeds(cfg)
    assert cfg.method.smoothgrad.seed is None and cfg.metric.mprt.seed is None              # the input is untouched
    assert out.method.smoothgrad.seed == derived_seed(7, "method", "smoothgrad")
    assert out.metric.mprt.seed == derived_seed(7, "metric", "mprt")
    assert out.method.random.seed == 3                                                     # pinned
    assert "seed" not in out.method.saliency and "seed" not in out.metric.pointing_game   # none is added
    assert out.dataset.seed == cfg.dataset.seed == 0 and out.model.train.seed == cfg.model.train.seed
    assert derive_seeds(out) == out                                                         # idempotent
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        derive_seeds(OmegaConf.merge(cfg, {"seed": -1}))


def test_api_defaults_are_a_default_runs_seeds():
    assert api.method("smoothgrad").keywords["seed"] == derived_seed(0, "method", "smoothgrad")
    assert api.method("smoothgrad", seed=5).keywords["seed"] == 5
    assert api.metric("mprt").fn.keywords["seed"] == derived_seed(0, "metric", "mprt")


def _scores(manifest: dict, out_dir, method: str) -> pd.DataFrame:
    cell = next(c for c in manifest["cells"] if c["method"] == method)
    s = pd.read_parquet(out_dir / cell["scores"])
    return s.sort_values(["score", "sample_id"]).reset_index(drop=True)[["score", "sample_id", "value"]]


def test_the_run_seed_changes_stochastic_cells_only_and_a_pinned_seed_is_honoured(tmp_path):
    torch.set_num_threads(1)
    common = [*TINY, f"cache_dir={tmp_path / 'cache'}"]
    pin = derived_seed(0, "method", "smoothgrad")
    runs = {name: run(_cfg(*common, *extra), out_dir=tmp_path / name) for name, extra in
            [("seed0", ["seed=0"]), ("seed1", ["seed=1"]), ("pinned", ["seed=1", f"method.smoothgrad.seed={pin}"]),
             ("budget", ["seed=0", "deterministic=true"])]}
    scores = {name: {m: _scores(man, tmp_path / name, m) for m in ("saliency", "smoothgrad")} for name, man in runs.items()}
    for man in runs.values():
        assert man["status"] == "complete" and len(man["cells"]) == 2
    # the manifest records the seeds used: derived from the run seed, or pinned
    for name, seed in (("seed0", 0), ("seed1", 1)):
        config = runs[name]["config"]
        assert runs[name]["seed"] == seed
        assert config["method"]["smoothgrad"]["seed"] == derived_seed(seed, "method", "smoothgrad")
        assert config["metric"]["pixel_flipping"]["seed"] == derived_seed(seed, "metric", "pixel_flipping")
    assert runs["pinned"]["config"]["method"]["smoothgrad"]["seed"] == pin
    # a stochastic cell changes with the run seed; a deterministic one does not
    assert not scores["seed0"]["smoothgrad"]["value"].equals(scores["seed1"]["smoothgrad"]["value"])
    assert scores["seed0"]["saliency"].equals(scores["seed1"]["saliency"])
    # smoothgrad pinned to seed 0's draws gives seed 0's scores under run seed 1 (pixel flipping at baseline 0
    # draws nothing, so its own seed changes nothing)
    assert scores["pinned"]["smoothgrad"].equals(scores["seed0"]["smoothgrad"])
    # pass sizes: tuned to the model (and recorded), or with deterministic=true the machine-independent byte
    # budget, which changes only the rounding of sums over draws
    assert runs["seed0"]["pass_sizes"]["source"] in ("probe", "cache", "memory")
    assert runs["budget"]["pass_sizes"]["source"] == "budget"
    for m in ("saliency", "smoothgrad"):
        torch.testing.assert_close(torch.tensor(scores["budget"][m]["value"].to_numpy()),
                                   torch.tensor(scores["seed0"][m]["value"].to_numpy()), rtol=1e-5, atol=1e-6)
    keys = {name: {c["method"]: c["key"] for c in man["cells"]} for name, man in runs.items() if name != "budget"}
    assert len({k["smoothgrad"] for k in keys.values()}) == 3                 # the seeds are in the cell keys
