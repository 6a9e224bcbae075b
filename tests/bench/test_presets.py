"""Every experiment preset composes, names only existing methods and metrics, and says what it reproduces."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from bench.config import CONF
from bench.run import check_targets

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes(preset):
    cfg = _compose(f"experiment={preset}")
    check_targets(cfg)
    assert cfg.method and cfg.metric
    header = (CONF / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_" and len([h for h in header if h.startswith("#")]) >= 3


def test_leaderboard_covers_the_whole_catalogue():
    cfg = _compose("experiment=leaderboard")
    assert set(cfg.method) == {p.stem for p in (CONF / "method").glob("*.yaml")}
    needs_training = {"data_randomization"}          # its own memorising model: in the adebayo2018 preset
    assert set(cfg.metric) == {p.stem for p in (CONF / "metric").glob("*.yaml")} - needs_training
    embedded = {p.stem for p in (CONF / "model").glob("*.yaml") if "\ntrain:" in p.read_text()}   # suite-trained
    assert set(cfg.hydra.sweeper.params.model.split(",")) == embedded


def test_paper_presets_configure_the_papers_protocol():
    samek = _compose("experiment=samek2017").metric.pixel_flipping
    assert (samek.patch, samek.baseline, samek.order) == (4, "uniform", "both")
    adebayo = _compose("experiment=adebayo2018").metric
    assert adebayo.mprt.order == "cascading_top_down" and adebayo.mprt_independent.order == "independent"
    assert _compose("experiment=arras2022").dataset.name == "shapes_multi"
