"""MPRT of a method declared model_free (methods.edge, centre, constant): one map and one comparison serve
every stage, with the scores that recomputing it at every stage gives; the random control is not declared."""
import pytest
import torch

import methods
from metrics import mprt
from metrics._stages import model_free


def _undeclared(method):
    """The same method without the declaration: today's path, a map per stage."""
    return lambda model, x, target: method(model, x, target)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 2, 1, 0])   # 32 px: HOG is defined


def test_declarations():
    assert all(model_free(m) for m in (methods.edge, methods.centre, methods.constant))
    assert not any(model_free(m) for m in (methods.random_map, methods.saliency, _undeclared(methods.edge)))
    import functools
    assert model_free(functools.partial(methods.centre, sigma=0.3))         # as Hydra's _partial_ gives it


@pytest.mark.parametrize("name", ["edge", "centre", "constant"])
@pytest.mark.parametrize("options", [{}, {"repeats": 2, "order": "independent", "explain": "prediction"},
                                     {"clip": 99.0, "absolute": False, "hog_correlation": "spearman"}])
def test_same_scores_as_a_map_per_stage(tiny_cnn, images, name, options):
    x, target = images
    method = getattr(methods, name)
    ours = mprt(tiny_cnn, x, target, method, **options)
    today = mprt(tiny_cnn, x, target, _undeclared(method), **options)
    assert ours.scores.keys() == today.scores.keys() and ours.curves.keys() == today.curves.keys()
    for k in today.scores:
        torch.testing.assert_close(ours.scores[k], today.scores[k], rtol=0, atol=0, equal_nan=True)
    for k in today.curves:
        torch.testing.assert_close(ours.curves[k].y, today.curves[k].y, rtol=0, atol=0, equal_nan=True)
        assert ours.curves[k].labels == today.curves[k].labels


def test_no_recomputation_and_no_model_pass(tiny_cnn, images):
    x, target = images
    calls, passes = [], []

    def counted(model, x, target):
        calls.append(len(x))
        return methods.edge(model, x, target)
    counted.model_free = True
    handle = tiny_cnn.register_forward_pre_hook(lambda *_: passes.append(1))   # deep copies keep the hook
    try:
        r = mprt(tiny_cnn, x, target, counted, attribution=methods.edge(tiny_cnn, x, target), repeats=2)
        assert calls == [4] and passes == []                                 # one map, no model pass
        mprt(tiny_cnn, x, target, _undeclared(counted), attribution=methods.edge(tiny_cnn, x, target))
        assert calls == [4] * 4 and passes == []                             # undeclared: a map per stage (3)
    finally:
        handle.remove()
    assert r.curves["spearman"].labels == ("fc", "conv2", "conv1")


def test_random_control_still_draws_per_stage(tiny_cnn, images):
    """random_map draws per (image, class, model): a new map at each stage, so MPRT scores chance, not 1."""
    x, target = images
    r = mprt(tiny_cnn, x, target, methods.random_map)
    assert r.scores["spearman@fc"].abs().max() < 0.2 and r.scores["spearman"].abs().max() < 0.2
