"""Agreement of our MPRT with Quantus 0.6.0's (an independent implementation) on the same model,
maps and randomization: Quantus re-draws every module that has `reset_parameters`, from the output
down, each after torch.manual_seed(seed + 1); ours reproduces that with layers = those modules,
seed = seed + 1 and layer_seed="shared". Quantus takes |map| / max|map| before Spearman, which
leaves ranks unchanged, so the per-layer Spearman similarities must agree to float precision.

Our `spearman` ranks Adebayo et al.'s ABS map sum_c |E_c| of the raw attribution; Quantus ranks |map| of
what its explain_func returns. So the explain_func handed to Quantus returns sum_c |E_c| (B, 1, H, W):
both then rank the same map (handing it sum_c E_c would compare Quantus' |sum_c E_c|, another map)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import methods
from bench.zoo import SmallCNN
from metrics import mprt, to_map

quantus = pytest.importorskip("quantus")

SEED = 42


def _explain(method):
    def explain(model, inputs, targets, **_):
        x, t = torch.as_tensor(inputs), torch.as_tensor(targets)
        return to_map(method(model, x, t), "abs_sum")[:, None].numpy()         # (B, 1, H, W) sum_c |E_c|
    return explain


@pytest.fixture(scope="module")
def setup():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SmallCNN(num_classes=6, width=8).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, generator=g)
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    return model, x, target


@pytest.mark.parametrize("method_name", ["saliency", "gradient_x_input", "guided_backprop"])
@pytest.mark.parametrize("order", ["top_down", "independent", "bottom_up"])
def test_per_layer_spearman_agrees_with_quantus(setup, method_name, order):
    model, x, target = setup
    method = getattr(methods, method_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = quantus.MPRT(layer_order=order, seed=SEED, abs=True, normalise=True, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=None,
            explain_func=_explain(method), channel_first=True, device="cpu", batch_size=64)
    layers = [name for name, m in model.named_modules() if hasattr(m, "reset_parameters")]
    assert list(ref)[1:] == (layers[::-1] if order == "top_down" else layers)
    ours = mprt(model, x, target, method, layers=layers, seed=SEED + 1, layer_seed="shared",
                order={"top_down": "cascading_top_down", "bottom_up": "cascading_bottom_up"}.get(order, order),
                measures=["spearman"])
    for name in layers:
        theirs = torch.tensor(ref[name], dtype=torch.float64)
        torch.testing.assert_close(ours.scores[f"spearman@{name}"].double(), theirs, atol=1e-5, rtol=0)
    # Quantus' "original" entry compares the given maps with themselves
    np.testing.assert_allclose(ref["original"], 1.0, atol=1e-6)
