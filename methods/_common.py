"""Shared plumbing of every method: the contract wrapper and seeded draws (baselines, the target output
and argument checks are shared with the metrics: metrics.baselines, metrics.checks)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
from numbers import Integral, Real
import typing
from typing import Any, Callable, Iterator, Literal, Union

import torch
from torch import Tensor, nn

from metrics.baselines import renamed
from metrics.checks import Unsupported

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def cannot_run(method: str, model: nn.Module | None, reason: str) -> Unsupported:
    """The one error a method raises when it cannot run on a model (metrics.checks.Unsupported, a ValueError):
    names method, model and reason."""
    return Unsupported(f"{method} cannot run on {type(model).__name__}: {reason}")


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


def _accepts(hint: Any, value: object) -> str | None:
    """None if `value` fits the annotation `hint`, else what it should be (bools are not numbers here)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        ok = any(value == c and type(value) is type(c) for c in choices)
        return None if ok else "one of " + ", ".join(map(repr, choices))
    if origin is Union or origin is types.UnionType:
        wants = [_accepts(arm, value) for arm in typing.get_args(hint)]
        return None if None in wants else " or ".join(wants)
    if hint is Tensor:
        return None if isinstance(value, Tensor) else "a tensor"
    if hint is type(None):
        return None if value is None else "null"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, Integral) and not isinstance(value, bool) else "an integer"
    if hint is float:
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok else "a finite number"
    return None                                                       # other types: the method checks them


def _checked_options(fn: Callable[..., Tensor]) -> Callable[[dict], None]:
    """A check of a method's keyword options against their annotations: steps=4.5, '8', True or a NaN
    noise raise one ValueError naming the method, the option, what it takes and what it got."""
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):                                    # unresolvable annotations: the method checks
        hints = {}
    params = {name: hints.get(name, Any) for name, p in inspect.signature(fn).parameters.items()
              if p.kind is p.KEYWORD_ONLY}

    def check(options: dict) -> None:
        for name, value in options.items():
            wanted = _accepts(params[name], value) if name in params else None
            if wanted is not None and name == "baseline" and renamed(value):
                raise ValueError(f"{fn.__name__}: {renamed(value)}")
            if wanted is not None:
                raise ValueError(f"{fn.__name__}: {name} must be {wanted}, got {value!r}")
    return check


def attribution_method(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap a method: check (x, target) and the options' types, enable gradients, restore the model
    on exit, detach the result."""
    check_options = _checked_options(fn)

    @functools.wraps(fn)
    def wrapper(model: nn.Module, x: Tensor, target: Tensor, *args, **options) -> Tensor:
        check_options(options)
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


def generator(seed: int) -> torch.Generator:
    """A CPU generator: draws are made on the CPU, then moved, so CPU and GPU see the same numbers."""
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def value_range(x: Tensor) -> Tensor:
    """Per-sample max - min over all pixels and channels, (B, 1, 1, 1)."""
    return (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
