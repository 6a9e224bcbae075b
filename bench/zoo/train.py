"""Train zoo models on a dataset the suite generates, and cache them keyed by what determines them.

A cached model `<name>-<key>.pt` has its sha256 beside it in `<name>-<key>.pt.sha256` (sha256sum's
format), written before the file itself is renamed into place; load_model checks it on every load,
and a file whose bytes changed (or that has no recorded digest) is retrained with a warning naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from bench.checks import check_cache_dir, check_name
from bench.files import shared_mode
from bench.zoo.sources import checkpoint_digest, expected_normalization, sha256

CACHE_FORMAT = 1          # bump when the checkpoint layout or the training code changes its result


class CacheIntegrityWarning(UserWarning):
    """A cached zoo model failed its sha256 check (or has none) and is retrained."""


def cache_key(model_cfg: DictConfig, dataset_cfg: DictConfig) -> str:
    """Hash of (architecture, training recipe, dataset generator), the things that fix the trained weights."""
    data = OmegaConf.to_container(dataset_cfg, resolve=True)
    for k in ("name", "split", "n_samples"):                        # the evaluated slice does not change training
        data.pop(k, None)
    payload = {"net": OmegaConf.to_container(model_cfg.net, resolve=True),
               "train": OmegaConf.to_container(model_cfg.train, resolve=True) if "train" in model_cfg else None,
               "dataset": data, "format": CACHE_FORMAT}
    if (payload["train"] or {}).get("permute_labels") is False:      # the default: same key as without it
        del payload["train"]["permute_labels"]
    digest = checkpoint_digest(model_cfg.net)
    if digest is not None:                                          # the file's content, not just its path
        payload["checkpoint_sha256"] = digest
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def accuracy(model: nn.Module, x: Tensor, target: Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on (x, target), evaluated in batches without gradients."""
    with torch.inference_mode():
        pred = torch.cat([model(xb).argmax(dim=1) for xb in x.split(batch_size)])
    return (pred == target).double().mean().item()


def fit(model: nn.Module, x: Tensor, target: Tensor, *, epochs: int, lr: float, batch_size: int,
        weight_decay: float, seed: int) -> None:
    """AdamW with a one-cycle schedule and cross-entropy; data order from its own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    batches = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * batches, pct_start=0.15)
    model.train()
    bar = tqdm(range(epochs), desc=f"train {type(model).__name__}", unit="epoch")
    for _ in bar:
        correct, total_loss = 0, 0.0
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            out = model(x[idx])
            loss = nn.functional.cross_entropy(out, target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += (out.argmax(dim=1) == target[idx]).sum().item()
            total_loss += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total_loss / len(x):.3f}", train_acc=f"{correct / len(x):.3f}")
    model.eval()


def permuted_labels(target: Tensor, *, seed: int) -> Tensor:
    """`target` under a seeded random permutation of the samples: same class counts, no link to the images."""
    perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    return target[perm.to(target.device)]


def _split(dataset_cfg: DictConfig, split: str, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    data = instantiate(dataset_cfg, split=split, n_samples=n).tensors()
    return data["x"].to(device), data["target"].to(device)


def _normalization(model_cfg: DictConfig, dataset: Any) -> dict[str, Any]:
    """The dataset's input normalisation, checked against what the model's pretrained weights expect."""
    have = {"mean": [float(v) for v in dataset.mean], "std": [float(v) for v in dataset.std]} if (
        getattr(dataset, "mean", None) is not None and getattr(dataset, "std", None) is not None) else None
    want = expected_normalization(model_cfg.net)                    # from the weights' metadata, no download
    if want is not None and (have is None or not all(
            torch.allclose(torch.tensor(have[k]), torch.tensor(want[k]), atol=1e-6) for k in ("mean", "std"))):
        raise ValueError(
            f"model {model_cfg.name}'s pretrained weights expect inputs normalised with mean={want['mean']}, "
            f"std={want['std']}, but dataset {getattr(dataset, 'name', '?')} normalises with "
            f"{'mean=' + str(have['mean']) + ', std=' + str(have['std']) if have else 'nothing it declares'}: "
            f"run with dataset.mean=[{','.join(map(str, want['mean']))}] dataset.std=[{','.join(map(str, want['std']))}] "
            "(as +dataset.mean=... where the dataset's YAML has no mean)")
    return {**(have or {}), "from": "dataset" if want is None else "weights (checked equal to the dataset's)"}


def _check_outputs(model: nn.Module, dataset: Any, name: str) -> None:
    """One forward pass on one item: the model must give one output per dataset class."""
    model.eval()                                                    # batch norm: leave running statistics alone
    with torch.inference_mode():
        out = model(dataset[0]["x"][None].to(next(model.parameters()).device))
    if out.ndim != 2 or out.shape[1] != dataset.num_classes:
        raise ValueError(f"model {name} outputs shape {tuple(out.shape)} for one input, but the dataset has "
                         f"{dataset.num_classes} classes: adapt the head (adapt_head: true) or build the model "
                         f"with num_classes={dataset.num_classes}")


def load_model(model_cfg: DictConfig, dataset_cfg: DictConfig, *, cache_dir: str | Path,
               device: torch.device | str = "cpu", retrain: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The zoo model of `model_cfg` for `dataset_cfg`: with a `train` section trained on the dataset
    (loaded from the cache, or trained and cached); without one used as built (torchvision or timm
    weights, a user's checkpoint, or random initialisation seeded by `seed`).

    Returns the model in eval mode on `device` and its info for the manifest: source (train,
    cache, torchvision, timm, checkpoint or init), checkpoint path and sha256, n_parameters, the
    input normalisation, accuracy and training time where trained. Checkpoints are read with
    `weights_only=True`: a file cannot run code. A cached file is used only when its sha256 matches
    the one recorded when it was written; otherwise it is retrained with a CacheIntegrityWarning, or,
    with `retrain=False` (a report reloading a run), refused.
    """
    device = torch.device(device)
    dataset = instantiate(dataset_cfg, n_samples=1)
    if getattr(dataset, "train_on", None):                          # built from another dataset's images (shapes_mosaic):
        dataset_cfg = OmegaConf.create(dataset.train_on)            # that dataset's models, trained and cached on it
        dataset = instantiate(dataset_cfg, n_samples=1)
    normalization = _normalization(model_cfg, dataset)             # before anything is downloaded
    t = model_cfg.get("train")
    if t is not None:
        check_name("model", model_cfg.get("name"))                 # part of the cache file's name
    with torch.random.fork_rng(devices=[]):                         # seeded init, global RNG left alone
        torch.manual_seed(t.seed if t is not None else model_cfg.get("seed", 0))
        try:
            model = instantiate(model_cfg.net, num_classes=dataset.num_classes).to(device)
        except InstantiationException as e:                         # Hydra wraps the factory's own error
            if isinstance(e.__cause__, ValueError):
                raise ValueError(f"model {model_cfg.name}: {e.__cause__}") from e.__cause__
            raise
    _check_outputs(model, dataset, model_cfg.name)
    origin = getattr(model, "zoo_source", None)
    key = cache_key(model_cfg, dataset_cfg)
    common = {"model": model_cfg.name, "key": key, "n_parameters": sum(p.numel() for p in model.parameters()),
              "normalization": normalization, **({"init": origin} if origin else {})}
    if t is None:
        return model.eval(), {**common, "source": origin["source"] if origin else "init", "cached": False,
                              "checkpoint": origin.get("checkpoint") if origin else None,
                              "sha256": origin.get("sha256") if origin else None}
    path = Path(cache_dir).expanduser() / f"{model_cfg.name}-{key}.pt"
    if path.exists():
        digest, problem = _verify(path)
        if problem is None:
            try:
                checkpoint = torch.load(path, map_location=device, weights_only=True)
                model.load_state_dict(checkpoint["state_dict"])
            except Exception as e:                                 # noqa: BLE001 - any unreadable file
                raise ValueError(f"cached checkpoint {path} cannot be loaded ({e}); delete it to retrain") from e
            return model.eval(), {**common, **checkpoint["info"], "source": "cache", "checkpoint": str(path),
                                  "sha256": digest, "sha256_verified": True, "cached": True}
        if not retrain:
            raise ValueError(f"cached model {path} {problem}: it cannot be trusted and is not retrained here; "
                             "re-run the experiment (python -m bench) to retrain it")
        warnings.warn(f"cached model {path} {problem}; retraining it", CacheIntegrityWarning, stacklevel=2)
    elif not retrain:
        raise ValueError(f"model {model_cfg.name} is not in the cache ({path}) and is not trained here; re-run the "
                         "experiment (python -m bench) to train it, or pass the cache_dir where it was cached")
    check_cache_dir(path.parent)                                    # before training, not after

    x, target = _split(dataset_cfg, "train", t.n_train, device)
    permute = bool(t.get("permute_labels", False))
    if permute:                                                     # Adebayo et al. 2018's data randomization
        target = permuted_labels(target, seed=t.seed)
    start = time.perf_counter()
    fit(model, x, target, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
        weight_decay=t.weight_decay, seed=t.seed)
    info = {
        **common, "train_seconds": round(time.perf_counter() - start, 2),
        "train_accuracy": accuracy(model, x, target),
        "test_accuracy": accuracy(model, *_split(dataset_cfg, "test", t.n_test, device)),
        "n_test": int(t.n_test),
        **({"permute_labels": True, "n_train": int(t.n_train)} if permute else {}),   # train accuracy: on permuted labels
    }
    print(f"trained {model_cfg.name}: {info['train_seconds']:.0f} s, "
          f"train accuracy {info['train_accuracy']:.4f}, test accuracy {info['test_accuracy']:.4f} (n={t.n_test})")
    digest = _save(path, {"state_dict": model.state_dict(), "info": info})
    return model.eval(), {**info, "source": "train", "checkpoint": str(path), "sha256": digest, "cached": False}


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verify(path: Path) -> tuple[str, str | None]:
    """(sha256 of the file, None) when it matches the digest recorded at writing, else (sha256, what is wrong)."""
    actual = sha256(path)
    try:
        recorded = _digest_path(path).read_text(encoding="ascii").split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return actual, f"has no recorded sha256 ({_digest_path(path).name} is missing or unreadable)"
    if recorded != actual:
        return actual, (f"does not match the sha256 recorded when it was written (recorded {recorded[:16]}..., "
                        f"file {actual[:16]}...): its bytes changed on disk")
    return actual, None


def _save(path: Path, checkpoint: dict[str, Any]) -> str:
    """Write `checkpoint` to `path` and its sha256 beside it, each atomically (temporary file + rename); the
    digest goes first, so a crash between the two leaves a mismatch (retrained), never an unchecked file."""
    tmp = []
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp.append(f.name)
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256(f.name)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="ascii") as g:
            tmp.append(g.name)
            g.write(f"{digest}  {path.name}\n")                    # sha256sum -c reads this format
        for name in tmp:                                            # tempfile's 0600 -> open()'s mode under the umask
            os.chmod(name, shared_mode())
        os.replace(g.name, _digest_path(path))
        os.replace(f.name, path)
    finally:
        for name in tmp:
            Path(name).unlink(missing_ok=True)
    return digest
