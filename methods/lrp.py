"""Layer-wise Relevance Propagation (Bach et al. 2015) through zennit composites and canonizers.

Conventions shared by every composite here: the output relevance is the target logit,
R = f_target(x) (one-hot times the output), so a conservative rule chain sums to f(x).
Batch norms are merged into the preceding conv/linear (zennit's SequentialMergeBatchNorm,
which follows leaf order). What else a model needs it declares itself, as it declares its
`mprt_layers`: `lrp_canonizers`, a sequence of zennit canonizers applied during the
attribution (e.g. ResidualSumCanonizer for residual blocks that add through an `add`
method); torchvision's ResNet blocks get zennit's block canonizers without declaring it.
Hooks, canonizers and merged parameters are removed and restored on exit, even on error.
"""
from __future__ import annotations

import types

import torch
import zennit.attribution
import zennit.canonizers
import zennit.composites
import zennit.layer
import zennit.rules
from torch import Tensor, nn
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear

from methods._common import attribution_method, cannot_run

_SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
              nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d,
              nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity, nn.Dropout, nn.Sequential)


def _stacked_add(self: nn.Module, *terms: Tensor) -> Tensor:
    """A block's `add` during LRP: the terms stacked on a new last axis and summed by a zennit Sum module."""
    return self.canonizer_sum(torch.stack(terms, dim=-1))


class ResidualSumCanonizer(zennit.canonizers.AttributeCanonizer):
    """Gives the residual addition of every `block_types` module an LRP rule (Norm: proportional split).

    Such a block adds its branches with a method `add(*terms)` (e.g. `return a + b`); during the
    attribution this replaces it by zennit's Sum module over the stacked terms, which the composites
    map to the Norm rule, as zennit's ResNetCanonizer does for torchvision. A model declares it:
    `lrp_canonizers = (ResidualSumCanonizer(MyBlock),)`.
    """

    def __init__(self, *block_types: type[nn.Module]) -> None:
        if not block_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in block_types):
            raise ValueError(f"ResidualSumCanonizer needs the nn.Module classes of the blocks, got {block_types!r}")
        self.block_types = block_types
        super().__init__(self._attribute_map)

    def _attribute_map(self, name: str, module: nn.Module) -> dict | None:
        if not isinstance(module, self.block_types):
            return None
        if not callable(getattr(module, "add", None)):
            raise ValueError(f"ResidualSumCanonizer: block {name!r} ({type(module).__name__}) has no method "
                             "add(*terms); write its residual addition as `return self.add(a, b)`")
        return {"add": types.MethodType(_stacked_add, module), "canonizer_sum": zennit.layer.Sum()}

    def copy(self) -> ResidualSumCanonizer:
        return ResidualSumCanonizer(*self.block_types)


def _canonizers(method: str, model: nn.Module) -> list[zennit.canonizers.Canonizer]:
    """Canonizers for `model`, or the one clear error when a layer is not supported."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    previous: nn.Module | None = None
    for name, m in leaves:
        if not isinstance(m, _SUPPORTED):
            raise cannot_run(method, model, f"layer {name!r} ({type(m).__name__}) has no LRP rule here")
        if isinstance(m, BatchNorm) and not isinstance(previous, Linear):
            raise cannot_run(method, model, f"batch norm {name!r} does not directly follow a conv or linear "
                                            "layer, so it cannot be merged into one")
        previous = m
    declared = list(getattr(model, "lrp_canonizers", ()))
    bad = [c for c in declared if not isinstance(c, zennit.canonizers.Canonizer)]
    if bad:
        raise ValueError(f"{method}: {type(model).__name__}.lrp_canonizers must be zennit canonizers, got "
                         f"{bad[0]!r}")                               # the model's declaration to fix, not a limit
    canonizers: list[zennit.canonizers.Canonizer] = [zennit.canonizers.SequentialMergeBatchNorm(), *declared]
    try:
        from torchvision.models.resnet import BasicBlock as TvBasic, Bottleneck as TvBottleneck
        if any(isinstance(m, (TvBasic, TvBottleneck)) for m in model.modules()):
            # the block canonizers alone: zennit's ResNetCanonizer merges the batch norms a second time
            # (SequentialMergeBatchNorm again), which breaks its own undo on bias-free convs
            from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
            canonizers += [ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()]
    except ImportError:                                                              # torchvision is optional
        pass
    return canonizers


def _relevance(model: nn.Module, x: Tensor, target: Tensor, composite: zennit.composites.Composite) -> Tensor:
    """Input relevance for output relevance one_hot(target) * f(x), hooks registered only inside the call."""
    def output_relevance(out: Tensor) -> Tensor:
        return torch.zeros_like(out).scatter_(1, target[:, None], out.gather(1, target[:, None])).detach()

    with zennit.attribution.Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.requires_grad_(), output_relevance)
    return relevance                                                                # (B, C, H, W)


def _layer_map(rule: zennit.core.Hook, stabilizer: float) -> list:
    """One rule on every conv and linear layer; activations pass, sums and average pools split proportionally."""
    return [(Activation, zennit.rules.Pass()), (zennit.layer.Sum, zennit.rules.Norm(stabilizer)),
            (AvgPool, zennit.rules.Norm(stabilizer)), (Convolution, rule), (Linear, rule)]


def _zero(zero_bias: bool) -> list[str] | None:
    return ["bias"] if zero_bias else None


@attribution_method
def lrp_epsilon(
    model: nn.Module, x: Tensor, target: Tensor, *, epsilon: float = 1e-6, zero_bias: bool = False,
) -> Tensor:
    """LRP-epsilon (Bach et al. 2015) on every layer: R_j = sum_k a_j w_jk / (z_k + eps sign(z_k)) R_k.

    z_k includes the bias, which absorbs relevance b_k / z_k R_k, unless zero_bias; sums and
    average pools split with the same eps. On a ReLU network, eps -> 0 gives gradient x input
    (Ancona et al. 2018), so sum_i R_i = f_target(x) - sum_b b df/db (tested on the zoo models).
    zero_bias conserves f_target(x) in exact arithmetic, but where z_k without its bias is near 0
    the relevances explode (seen on untrained nets).
    """
    rule = zennit.rules.Epsilon(epsilon=epsilon, zero_params=_zero(zero_bias))
    composite = zennit.composites.LayerMapComposite(_layer_map(rule, epsilon),
                                                    canonizers=_canonizers("lrp_epsilon", model))
    return _relevance(model, x, target, composite)


@attribution_method
def lrp_gamma(
    model: nn.Module, x: Tensor, target: Tensor, *, gamma: float = 0.25, zero_bias: bool = False,
) -> Tensor:
    """LRP-gamma (Montavon et al. 2019) on every layer: R_j = sum_k a_j (w_jk + gamma w_jk^+) / sum_j (...) R_k.

    zennit's Gamma rule (gamma = 0.25 as in the paper's middle layers); the bias enters z unless zero_bias.
    """
    rule = zennit.rules.Gamma(gamma=gamma, zero_params=_zero(zero_bias))
    composite = zennit.composites.LayerMapComposite(_layer_map(rule, 1e-6), canonizers=_canonizers("lrp_gamma", model))
    return _relevance(model, x, target, composite)


@attribution_method
def lrp_alpha1_beta0(model: nn.Module, x: Tensor, target: Tensor, *, zero_bias: bool = False) -> Tensor:
    """LRP-alpha1-beta0 (Bach et al. 2015), the z+ rule: only positive contributions a_j w_jk^+ carry relevance.

    Every conv and linear layer uses AlphaBeta(alpha=1, beta=0).
    """
    rule = zennit.rules.AlphaBeta(alpha=1.0, beta=0.0, zero_params=_zero(zero_bias))
    composite = zennit.composites.LayerMapComposite(_layer_map(rule, 1e-6),
                                                    canonizers=_canonizers("lrp_alpha1_beta0", model))
    return _relevance(model, x, target, composite)


@attribution_method
def lrp_epsilon_plus_flat(model: nn.Module, x: Tensor, target: Tensor, *, epsilon: float = 1e-6) -> Tensor:
    """LRP composite EpsilonPlusFlat (Kohlbrenner et al. 2020; zennit): flat rule on the first layer,
    z+ on the other convs, epsilon on the dense layers."""
    composite = zennit.composites.EpsilonPlusFlat(epsilon=epsilon,
                                                  canonizers=_canonizers("lrp_epsilon_plus_flat", model))
    return _relevance(model, x, target, composite)


@attribution_method
def lrp_epsilon_gamma_box(
    model: nn.Module, x: Tensor, target: Tensor, *,
    epsilon: float = 1e-6, gamma: float = 0.25, low: float | None = None, high: float | None = None,
) -> Tensor:
    """LRP composite EpsilonGammaBox (Montavon et al. 2019; zennit): z^B box rule on the first conv,
    gamma on the other convs, epsilon on the dense layers.

    The box is [low, high] in the normalised input space; null takes each sample's own
    per-channel min and max (batch-invariant, but then the box depends on the image).
    """
    lo = x.amin(dim=(2, 3), keepdim=True).expand_as(x) if low is None else torch.full_like(x, low)
    hi = x.amax(dim=(2, 3), keepdim=True).expand_as(x) if high is None else torch.full_like(x, high)
    composite = zennit.composites.EpsilonGammaBox(low=lo, high=hi, epsilon=epsilon, gamma=gamma,
                                                  canonizers=_canonizers("lrp_epsilon_gamma_box", model))
    return _relevance(model, x, target, composite)
