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
    needs_mosaics = {"focus"}                         # scores 2x2 mosaics only: dataset=shapes_mosaic
    assert set(cfg.metric) == {p.stem for p in (CONF / "metric").glob("*.yaml")} - needs_mosaics   # data randomization too
    embedded = {p.stem for p in (CONF / "model").glob("*.yaml") if "\ntrain:" in p.read_text()}   # suite-trained
    assert set(cfg.hydra.sweeper.params.model.split(",")) == embedded


def test_paper_presets_configure_the_papers_protocol():
    samek = _compose("experiment=samek2017").metric.pixel_flipping
    assert (samek.patch, samek.baseline, samek.order) == (4, "uniform", "both")
    adebayo = _compose("experiment=adebayo2018").metric
    assert adebayo.mprt.order == "cascading_top_down" and adebayo.mprt_independent.order == "independent"
    assert _compose("experiment=arras2022").dataset.name == "shapes_multi"


def test_latec2024_has_latecs_metrics_per_family_and_arguments():
    """LATEC's 20 image metrics (configs/eval_method/image.yaml), by family as our report ranks them."""
    from hydra.utils import instantiate

    from metrics import family

    cfg = _compose("experiment=latec2024")
    families: dict[str, set[str]] = {}
    for name, node in cfg.metric.items():
        families.setdefault(family(instantiate(node)), set()).add(name)
    assert families == {
        "faithfulness": {"faithfulness_correlation", "faithfulness_estimate", "monotonicity_correlation",
                         "pixel_flipping", "region_perturbation", "insertion", "deletion", "irof", "road",
                         "sufficiency", "infidelity"},        # LATEC's robustness criterion holds infidelity
        "robustness": {"local_lipschitz_estimate", "max_sensitivity", "continuity", "relative_input_stability",
                       "relative_output_stability", "relative_representation_stability"},
        "complexity": {"sparseness", "complexity", "effective_complexity"},
    }
    m = cfg.metric
    assert (m.faithfulness_correlation.subsets, m.faithfulness_estimate.steps, m.pixel_flipping.steps) == (100, 224, 224)
    assert (m.monotonicity_correlation.steps, m.monotonicity_correlation.samples) == (16, 10)
    rp = m.region_perturbation
    assert (rp.patch, rp.steps, rp.max_fraction * 256, rp.baseline) == (4, 10, 10, "uniform")
    assert (m.max_sensitivity.samples, m.local_lipschitz_estimate.samples, m.relative_input_stability.samples) == (10, 5, 5)
    assert m.infidelity.perturbations == 50 and m.road.noise == 0.1
    assert len(cfg.method) == 15 and "expected_gradients" in cfg.method        # 14 of LATEC's 17, plus random
    assert cfg.hydra.sweeper.params.model == "small_cnn,resnet,vit"
