"""The stages of the model parameter randomization tests (Adebayo et al. 2018): which layers, in which
order, re-drawn from which seeds; mprt, emprt, smprt (metrics.randomization) and the report's MPRT grid
all take their randomized models from `mprt_stages`."""
from __future__ import annotations

import copy
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

Order = Literal["cascading_top_down", "cascading_bottom_up", "independent", "cascading"]


def randomization_layers(model: nn.Module) -> list[str]:
    """Names of the layers MPRT randomizes, from input to output.

    A model may declare them as `mprt_layers` (e.g. one entry per residual block);
    otherwise every module that owns parameters directly, in registration order.
    """
    declared = getattr(model, "mprt_layers", None)
    if declared is not None:
        return list(declared)
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def model_free(method: Any) -> bool:
    """Whether `method` declares its map a function of the input alone, neither of the model's weights nor
    of the class (`model_free = True` on it or on the function under a functools.partial or wrapper's
    `func`: methods.edge, centre, constant): MPRT then computes one map and one comparison for every stage."""
    for _ in range(32):                                   # a bounded walk: a `func` that refers back cannot loop
        if method is None:
            return False
        if getattr(method, "model_free", False) is True:
            return True
        method = getattr(method, "func", None)
    return False


def _randomize(layer: nn.Module, seed: int, init: Literal["default", "normal"], std: float) -> None:
    """Re-draw a layer's parameters (default initialisation, or N(0, std^2)) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in layer.modules():
            if init == "default" and hasattr(m, "reset_parameters"):
                m.reset_parameters()                          # batch norm: also its running statistics
            elif init == "normal":
                for p in m.parameters(recurse=False):
                    p.normal_(0.0, std)


def _stages(model: nn.Module, layers: Sequence[str] | None, exclude: Sequence[str],
            order: str) -> list[tuple[int, str]]:
    """(input-to-output index, name) of each layer in the order the stages randomize them."""
    names = [n for n in (list(layers) if layers is not None else randomization_layers(model)) if n not in exclude]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing or not names:
        raise ValueError(f"layers {missing or names} are not modules of {type(model).__name__}; "
                         f"choose among {[n for n in modules if n]}")
    if order not in ("cascading_top_down", "cascading_bottom_up", "independent", "cascading"):
        raise ValueError("order must be 'cascading_top_down' (alias 'cascading'), 'cascading_bottom_up' "
                         f"or 'independent', got {order!r}")
    indexed = list(enumerate(names))
    return indexed if order == "cascading_bottom_up" else indexed[::-1]


def mprt_stages(
    model: nn.Module,
    *,
    order: Order = "cascading_top_down",
    layers: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    layer_seed: Literal["offset", "shared"] = "offset",
    init: Literal["default", "normal"] = "default",
    init_std: float = 0.01,
) -> Iterator[tuple[str, nn.Module]]:
    """The randomized models of `mprt`'s stages, in its order and with its seeds: yields (layer, model).

    Same arguments and conventions as `mprt` (its first draw; draw r of `repeats` is seed + 100003 r):
    one deep copy of `model` is changed stage by stage (`independent`: the layer is restored when
    the next stage is asked for), so code that recomputes maps at each yield sees exactly the models
    `mprt` compares (the report's MPRT grid of maps does). `model` is never modified, nor the global RNG.
    """
    stages = _stages(model, layers, exclude, order)                  # arguments checked now, not at first next()
    if layer_seed not in ("offset", "shared") or init not in ("default", "normal"):
        raise ValueError(f"layer_seed must be 'offset' or 'shared' and init 'default' or 'normal', "
                         f"got {layer_seed!r} and {init!r}")

    def stage_models() -> Iterator[tuple[str, nn.Module]]:
        randomized = copy.deepcopy(model)
        modules = dict(randomized.named_modules())
        for i, name in stages:
            saved = {k: v.clone() for k, v in modules[name].state_dict().items()} if order == "independent" else None
            _randomize(modules[name], seed + i if layer_seed == "offset" else seed, init, init_std)
            yield name, randomized
            if saved is not None:
                modules[name].load_state_dict(saved)
    return stage_models()


def _fully_randomized(model: nn.Module, layers: Sequence[str] | None, exclude: Sequence[str], seed: int) -> nn.Module:
    """A copy of `model` with every MPRT layer re-drawn as at mprt's last cascading stage."""
    *_, (_, randomized) = mprt_stages(model, order="cascading_bottom_up", layers=layers, exclude=exclude, seed=seed)
    return randomized
