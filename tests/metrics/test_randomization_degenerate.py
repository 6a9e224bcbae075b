"""The randomization tests' `degenerate` context score: a pair with a constant map has no rank order to compare."""
import pytest
import torch

from metrics import CONTEXT_SCORES, data_randomization, mprt, random_logit, ranked, similarities
from metrics.randomization import degenerate

NORMAL = torch.arange(16.0).reshape(1, 1, 4, 4)                     # 16 distinct values
TWO = (torch.arange(16.0) % 2).reshape(1, 1, 4, 4)                   # two distinct values: ranks defined
CONSTANT = torch.full((1, 1, 4, 4), 0.5)                             # one value (an all-zero CAM after ReLU)


@pytest.mark.parametrize("a, b, expected", [
    (NORMAL, NORMAL.flip(-1), 0.0), (TWO, NORMAL, 0.0), (NORMAL, TWO, 0.0),
    (CONSTANT, NORMAL, 1.0), (NORMAL, CONSTANT, 1.0), (CONSTANT, CONSTANT, 1.0), (torch.zeros(1, 1, 4, 4), TWO, 1.0)])
def test_degenerate_is_a_constant_map_on_either_side(a, b, expected):
    assert degenerate(a, b).tolist() == [expected]


def test_degenerate_marks_what_similarities_scores_by_convention():
    """Where degenerate is 1 Spearman is 0 (constant="zero") or NaN without a measurement; where it is 0 Spearman is
    measured: a two-valued map against its own shuffle gives a real correlation."""
    a = torch.cat([NORMAL, TWO, CONSTANT, NORMAL])
    b = torch.cat([CONSTANT, TWO.flip(-1), NORMAL, NORMAL.flip(-2)])
    flag = degenerate(a, b)
    s = similarities(a, b, measures=["spearman"])["spearman"]
    assert flag.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert s[0] == 0 and s[2] == 0 and s[1] == -1 and s[3] == pytest.approx(-18.75 / 21.25)   # -16 var r + var c
    assert torch.isnan(similarities(a, b, measures=["spearman"], constant="nan")["spearman"][[0, 2]]).all()


def test_signed_map_cancelling_over_channels_is_degenerate():
    """Channels +E and -E: the ABS map sum_c |E_c| varies, the signed map sum_c E_c is 0 everywhere."""
    e = torch.cat([NORMAL, -NORMAL], dim=1)                         # (1, 2, 4, 4)
    assert degenerate(e, NORMAL).tolist() == [1.0]
    assert degenerate(e.abs(), NORMAL).tolist() == [0.0]


def test_degenerate_clip_and_errors():
    """A 99th-percentile clip of a map with one outlier leaves it non-constant; a one-hot map clipped at its 50th
    percentile becomes constant."""
    one_hot = torch.zeros(1, 1, 4, 4)
    one_hot[0, 0, 0, 0] = 1
    assert degenerate(one_hot, NORMAL).tolist() == [0.0]
    assert degenerate(one_hot, NORMAL, clip=50).tolist() == [1.0]
    with pytest.raises(ValueError, match="same batch and spatial shape"):
        degenerate(NORMAL, torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="clip must be a percentile"):
        degenerate(NORMAL, NORMAL, clip=0)


class _Scale(torch.nn.Module):
    """f(x) = w * sum(x), two outputs; `w` is the only parameter randomization touches."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(1, 2, bias=False)
        torch.nn.init.ones_(self.w.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x.flatten(1).sum(dim=1, keepdim=True))


def _collapses(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x on the trained model (weights 1), an all-zero map on any other model, as a ReLU'd CAM that dies."""
    return x if bool((model.w.weight == 1).all()) else torch.zeros_like(x)


def test_mprt_random_logit_and_data_randomization_report_degenerate_pairs():
    x = torch.arange(2 * 16.0).reshape(2, 1, 4, 4)
    target = torch.tensor([0, 1])
    model = _Scale().eval()
    r = mprt(model, x, target, _collapses, layers=["w"], measures=["spearman"])
    assert r.scores["spearman"].tolist() == [0.0, 0.0]                  # a "perfect" decorrelation ...
    assert r.scores["degenerate"].tolist() == [1.0, 1.0] == r.scores["degenerate@w"].tolist()   # ... not measured
    assert "degenerate" not in r.curves and r.higher_is_better["degenerate"] is False
    kept = mprt(model, x, target, lambda m, x, t: x, layers=["w"], measures=["spearman"], repeats=2)
    assert kept.scores["degenerate"].tolist() == [0.0, 0.0] and "degenerate_std" not in kept.scores
    assert kept.scores["spearman"].tolist() == [1.0, 1.0]
    other = random_logit(model, x, target, lambda m, x, t: x * (t == 0).view(-1, 1, 1, 1), measures=["spearman"],
                         sign_flip=True)
    assert other.scores["degenerate"].tolist() == [1.0, 1.0]            # one side all zero in each sample
    dead = _Scale().eval()
    torch.nn.init.zeros_(dead.w.weight)
    d = data_randomization(model, x, target, _collapses, dead, measures=["spearman"])
    assert d.scores["degenerate"].tolist() == [1.0, 1.0]
    assert "degenerate" in CONTEXT_SCORES and not ranked("degenerate")
