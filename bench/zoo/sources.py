"""Zoo entries the suite does not define itself: torchvision and timm models by name, and a user's
own nn.Module from a state-dict file.

Each factory takes the dataset's `num_classes` first (load_model passes it), builds the model,
and records where its weights came from in `model.zoo_source` (a plain dict that load_model
copies into the manifest's model_info): source, weights, checkpoint path and sha256, and the
input normalisation the weights expect. That normalisation is never guessed and never applied
by the model: load_model compares it with the dataset's own (`dataset.mean`, `dataset.std`)
before any download and refuses a mismatch, naming the dataset overrides that fix it.
State dicts are read with `torch.load(..., weights_only=True)`: a checkpoint cannot run code.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

TORCHVISION = "bench.zoo.torchvision_model"
TIMM = "bench.zoo.timm_model"


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """(state dict, sha256) of a checkpoint file, read with weights_only=True.

    Accepts a plain state dict or a dict holding one under "state_dict" or "model" (the suite's
    own cache files, Lightning checkpoints). Every failure is a ValueError saying what to do.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist (or is not a file): give the path of a state-dict "
                         "file saved with torch.save(model.state_dict(), path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:                                                    # a class or function, not only tensors
            raise ValueError(f"checkpoint {str(path)!r} holds a pickled Python object ({found.group(1)}, e.g. from "
                             "torch.save(model)), which is not loaded because unpickling can run arbitrary code: "
                             "save model.state_dict() instead") from e
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch file (the weights-only unpickler "
                         "rejected its content)") from e
    except (RuntimeError, EOFError, OSError, KeyError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    state = obj
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        state = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} is not a state dict (a mapping of names to tensors, possibly "
                         f"under 'state_dict'); got {type(obj).__name__}: save model.state_dict()")
    return dict(state), sha256(path)


def load_weights(model: nn.Module, state: Mapping[str, Tensor], path: str | Path, *, strict: bool = True) -> None:
    """model.load_state_dict(state), with a wrong-architecture error that lists what does not match."""
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or (strict and (missing or unexpected)):
        def few(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        parts = ([f"shape mismatch: {few(shapes)}"] if shapes else []) + (
            [f"missing in checkpoint: {few(missing)}"] if missing and strict else []) + (
            [f"not in model: {few(unexpected)}"] if unexpected and strict else [])
        raise ValueError(f"checkpoint {str(path)!r} does not fit {type(model).__name__} (wrong architecture or "
                         f"constructor arguments?): {'; '.join(parts)}")
    model.load_state_dict(state, strict=strict)


def _hook_safe(model: nn.Module) -> nn.Module:
    """Switch off in-place activations (captum's and zennit's hooks need the inputs intact)."""
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return model


def _head(model: nn.Module) -> tuple[str, nn.Linear | nn.Conv2d] | None:
    """The classifier head: the last nn.Linear (or, without one, the last 1x1 conv, as in SqueezeNet)
    in registration order."""
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)] or [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    return heads[-1] if heads else None


def _replace_head(model: nn.Module, num_classes: int) -> str:
    """Replace the classifier head by a freshly initialised one with `num_classes` outputs."""
    head = _head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or 1x1 conv head to adapt: set adapt_head: false "
                         "and use a dataset with as many classes as the model has outputs")
    name, old = head
    new = (nn.Linear(old.in_features, num_classes, bias=old.bias is not None) if isinstance(old, nn.Linear) else
           nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None))
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new.to(old.weight.device))
    return name


def _weights_enum(arch: str, weights: str) -> Any:
    import torchvision.models as tvm
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise ValueError(f"torchvision has no model {arch!r}: pick one of torchvision.models.list_models()") from e
    try:
        return enum.verify(weights)
    except (KeyError, TypeError) as e:
        raise ValueError(f"weights {weights!r} are not weights of torchvision's {arch}: pick one of "
                         f"{['DEFAULT'] + [w.name for w in enum]}, or null for random initialisation") from e


def torchvision_model(num_classes: int, *, arch: str, weights: str | None = None, checkpoint: str | None = None,
                      adapt_head: bool = True, options: Mapping[str, Any] | None = None) -> nn.Module:
    """Any torchvision classification model by name (torchvision.models.get_model(arch, **options)).

    Weights: `weights` (an enum name such as DEFAULT or IMAGENET1K_V1; torchvision downloads
    them on first use into its hub cache), or `checkpoint` (a local state-dict file for the
    model as get_model builds it), or neither (random initialisation). With `adapt_head` the
    head (the last nn.Linear, or SqueezeNet's 1x1 conv) is replaced by a fresh one with the
    dataset's `num_classes` outputs when they differ, seeded by the entry's `seed`. In-place activations are switched off. The weights' normalisation (their
    transforms' mean and std) is recorded in `zoo_source["normalization"]`.
    """
    import torchvision.models as tvm
    if arch not in tvm.list_models(module=tvm):
        raise ValueError(f"{arch!r} is not a torchvision classification model: pick one of "
                         "torchvision.models.list_models(module=torchvision.models)")
    if weights is not None and checkpoint is not None:
        raise ValueError("give either weights (torchvision's) or checkpoint (a local file), not both")
    enum = _weights_enum(arch, weights) if weights is not None else None
    model = tvm.get_model(arch, weights=enum, **dict(options or {}))
    info: dict[str, Any] = {"source": "torchvision", "arch": arch, "weights": str(enum) if enum else None,
                            "checkpoint": None, "sha256": None, "normalization": _tv_normalization(enum)}
    if enum is not None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        info.update(url=enum.url, checkpoint=str(cached), sha256=sha256(cached) if cached.is_file() else None)
    if checkpoint is not None:
        state, digest = read_state_dict(checkpoint)
        load_weights(model, state, checkpoint)
        info.update(source="checkpoint", checkpoint=str(Path(checkpoint).expanduser()), sha256=digest)
    return _finish(model, num_classes, adapt_head, info)


def _tv_normalization(enum: Any) -> dict[str, Any] | None:
    """mean, std, resize and crop size of torchvision weights' transforms (no download)."""
    if enum is None:
        return None
    t = enum.transforms()
    return {"mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std],
            "resize_size": list(t.resize_size), "crop_size": list(t.crop_size)}


def _finish(model: nn.Module, num_classes: int, adapt_head: bool, info: dict[str, Any]) -> nn.Module:
    out = _outputs(model)
    info["head"] = None
    if adapt_head and out != num_classes:
        info["head"] = f"{_replace_head(model, num_classes)}: {out} -> {num_classes} outputs (new, randomly initialised)"
    model.zoo_source = info
    return _hook_safe(model)


def _outputs(model: nn.Module) -> int | None:
    head = _head(model)
    return None if head is None else head[1].out_features if isinstance(head[1], nn.Linear) else head[1].out_channels


def timm_model(num_classes: int, *, arch: str, pretrained: bool = False, checkpoint: str | None = None,
               adapt_head: bool = True, options: Mapping[str, Any] | None = None) -> nn.Module:
    """A timm model by name (timm.create_model), an optional extra: `pip install timm`.

    `pretrained` downloads timm's weights (from the Hugging Face hub); `checkpoint` loads a local
    state dict instead. With `adapt_head` timm's reset_classifier gives the dataset's classes.
    The normalisation of the pretrained weights (pretrained_cfg mean, std) is recorded.
    """
    timm = _timm()
    if pretrained and checkpoint is not None:
        raise ValueError("give either pretrained: true (timm's weights) or checkpoint (a local file), not both")
    if arch not in timm.list_models():
        raise ValueError(f"timm has no model {arch!r}: pick one of timm.list_models()")
    model = timm.create_model(arch, pretrained=pretrained, **dict(options or {}))
    info: dict[str, Any] = {"source": "timm", "arch": arch, "weights": None, "checkpoint": None, "sha256": None,
                            "normalization": _timm_normalization(arch) if pretrained else None}
    if pretrained:
        info["weights"] = str(getattr(model, "pretrained_cfg", {}).get("hf_hub_id") or arch)
    if checkpoint is not None:
        state, digest = read_state_dict(checkpoint)
        load_weights(model, state, checkpoint)
        info.update(source="checkpoint", checkpoint=str(Path(checkpoint).expanduser()), sha256=digest)
    if adapt_head and model.num_classes != num_classes:
        info["head"] = f"reset_classifier: {model.num_classes} -> {num_classes} outputs (new, randomly initialised)"
        model.reset_classifier(num_classes)
    else:
        info["head"] = None
    model.zoo_source = info
    return _hook_safe(model)


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise ValueError("the timm zoo entry needs timm, an optional extra: pip install timm") from e
    return timm


def _timm_normalization(arch: str) -> dict[str, Any] | None:
    cfg = _timm().models.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "input_size": list(cfg.get("input_size") or [])}


def from_checkpoint(num_classes: int, *, module: nn.Module, checkpoint: str, strict: bool = True) -> nn.Module:
    """A user's own nn.Module (`module`, built by Hydra from its `_target_` and arguments) with the
    state dict of the file `checkpoint`, read with weights_only=True. The module must already
    have the dataset's `num_classes` outputs (load_model checks it with one forward pass)."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module (a `_target_` of your class with its arguments), got "
                         f"{type(module).__name__}")
    state, digest = read_state_dict(checkpoint)
    load_weights(module, state, checkpoint, strict=strict)
    module.zoo_source = {"source": "checkpoint", "arch": f"{type(module).__module__}.{type(module).__qualname__}",
                         "weights": None, "checkpoint": str(Path(checkpoint).expanduser()), "sha256": digest,
                         "normalization": None, "head": None}
    return _hook_safe(module)


def expected_normalization(net_cfg: DictConfig) -> dict[str, Any] | None:
    """The normalisation a zoo entry's pretrained weights expect, read from their metadata without
    building the model or downloading anything; None when the entry names no pretrained weights."""
    target = net_cfg.get("_target_")
    if target in (TORCHVISION, "bench.zoo.sources.torchvision_model") and net_cfg.get("weights") is not None:
        return _tv_normalization(_weights_enum(net_cfg.arch, net_cfg.weights))
    if target in (TIMM, "bench.zoo.sources.timm_model") and net_cfg.get("pretrained"):
        return _timm_normalization(net_cfg.arch)
    return None


def checkpoint_digest(net_cfg: DictConfig) -> str | None:
    """sha256 of the local checkpoint file a zoo entry names (None if it names none or it is missing)."""
    path = OmegaConf.select(net_cfg, "checkpoint", default=None)
    return sha256(Path(path).expanduser()) if path and Path(path).expanduser().is_file() else None
