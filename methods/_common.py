"""Shared plumbing of every method: the contract wrapper, baselines and seeded draws."""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Literal, Union

import torch
from torch import Tensor, nn

from metrics._perturb import gaussian_blur                    # one blur for methods and metrics

Baseline = Union[float, Literal["zeros", "mean", "blur", "uniform"]]
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def cannot_run(method: str, model: nn.Module | None, reason: str) -> ValueError:
    """The one error a method raises when it cannot run on a model: names method, model and reason."""
    return ValueError(f"{method} cannot run on {type(model).__name__}: {reason}")


@contextlib.contextmanager
def _restored(model: nn.Module | None) -> Iterator[None]:
    """Restore every module's mode and hook dicts and every parameter's requires_grad on exit, even on error."""
    if model is None:
        yield
        return
    modules = list(model.modules())
    state = [(m, m.training, m._is_full_backward_hook, {k: dict(getattr(m, k)) for k in _HOOK_DICTS if hasattr(m, k)})
             for m in modules]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for m, training, full, hooks in state:
            m.training, m._is_full_backward_hook = training, full
            for k, before in hooks.items():
                d = getattr(m, k)
                for key in [key for key in d if key not in before]:
                    del d[key]
        for p, flag in flags:
            p.requires_grad_(flag)


def attribution_method(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap a method: check (x, target), enable gradients, restore the model on exit, detach the result."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, x: Tensor, target: Tensor, *args, **options) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"{fn.__name__}: x must be a float tensor (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not isinstance(target, Tensor) or target.shape != (x.shape[0],):
            raise ValueError(f"{fn.__name__}: target must have shape ({x.shape[0]},), got "
                             f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}")
        x = x.detach().clone() if x.is_inference() else x.detach()
        with _restored(model), torch.enable_grad():
            a = fn(model, x, target.to(x.device), *args, **options)
        return a.detach().expand_as(x).to(x.dtype).contiguous()       # (B, C, H, W); CAMs broadcast

    return wrapper


def input_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """d f_target / d x for every sample, without touching any parameter's .grad."""
    x = x.detach().requires_grad_()
    out = model(x).gather(1, target[:, None]).sum()
    return torch.autograd.grad(out, x)[0]                                          # (B, C, H, W)


def score(model: nn.Module, x: Tensor, target: Tensor, output: Literal["logit", "softmax"] = "logit") -> Tensor:
    """Target logit or probability, (B,)."""
    out = model(x)
    out = out.softmax(dim=1) if output == "softmax" else out
    return out.gather(1, target[:, None]).squeeze(1)


def generator(seed: int) -> torch.Generator:
    """A CPU generator: draws are made on the CPU, then moved, so CPU and GPU see the same numbers."""
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def value_range(x: Tensor) -> Tensor:
    """Per-sample max - min over all pixels and channels, (B, 1, 1, 1)."""
    return (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)


def baseline_for(x: Tensor, baseline: Baseline, *, seed: int = 0, blur_sigma: float = 5.0) -> Tensor:
    """One reference input per sample, (B, C, H, W).

    A number: that constant (in the normalised space). zeros: 0. mean: each channel
    at the sample's mean colour. blur: the sample blurred with `blur_sigma` pixels
    (Sturmfels et al. 2020). uniform: U(min, max) of the sample's own range, the
    pattern drawn once from `seed` and shared by every sample (batch-invariant).
    """
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    if baseline == "blur":
        if blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be positive (pixels), got {blur_sigma}")
        return gaussian_blur(x, blur_sigma)
    if baseline == "uniform":
        u = torch.rand(x.shape[1:], generator=generator(seed)).to(device=x.device, dtype=x.dtype)   # (C, H, W)
        return x.amin(dim=(1, 2, 3), keepdim=True) + value_range(x) * u
    raise ValueError(f"baseline must be a number or one of 'zeros', 'mean', 'blur', 'uniform', got {baseline!r}")


def check_positive(name: str, value: float) -> None:
    """ValueError unless value > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
