"""Train zoo models on a dataset the suite generates, and cache them keyed by what determines them."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

CACHE_FORMAT = 1          # bump when the checkpoint layout or the training code changes its result


def cache_key(model_cfg: DictConfig, dataset_cfg: DictConfig) -> str:
    """Hash of (architecture, training recipe, dataset generator), the things that fix the trained weights."""
    data = OmegaConf.to_container(dataset_cfg, resolve=True)
    for k in ("name", "split", "n_samples"):                        # the evaluated slice does not change training
        data.pop(k, None)
    payload = {"net": OmegaConf.to_container(model_cfg.net, resolve=True),
               "train": OmegaConf.to_container(model_cfg.train, resolve=True),
               "dataset": data, "format": CACHE_FORMAT}
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


def _split(dataset_cfg: DictConfig, split: str, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    data = instantiate(dataset_cfg, split=split, n_samples=n).tensors()
    return data["x"].to(device), data["target"].to(device)


def load_model(model_cfg: DictConfig, dataset_cfg: DictConfig, *, cache_dir: str | Path,
               device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The zoo model of `model_cfg` trained on `dataset_cfg`: loaded from the cache, or trained and cached.

    Returns the model in eval mode on `device` and its info (accuracy, training time, key, checkpoint path).
    Checkpoints are read with `weights_only=True`: a cache file cannot run code.
    """
    device = torch.device(device)
    num_classes = instantiate(dataset_cfg, n_samples=1).num_classes
    with torch.random.fork_rng(devices=[]):                         # seeded init, global RNG left alone
        torch.manual_seed(model_cfg.train.seed)
        model = instantiate(model_cfg.net, num_classes=num_classes).to(device)
    key = cache_key(model_cfg, dataset_cfg)
    path = Path(cache_dir).expanduser() / f"{model_cfg.name}-{key}.pt"
    if path.exists():
        try:
            checkpoint = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(checkpoint["state_dict"])
        except Exception as e:                                     # noqa: BLE001 - any unreadable file
            raise ValueError(f"cached checkpoint {path} cannot be loaded ({e}); delete it to retrain") from e
        return model.eval(), {**checkpoint["info"], "checkpoint": str(path), "cached": True}

    t = model_cfg.train
    x, target = _split(dataset_cfg, "train", t.n_train, device)
    start = time.perf_counter()
    fit(model, x, target, epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
        weight_decay=t.weight_decay, seed=t.seed)
    info = {
        "model": model_cfg.name, "key": key, "train_seconds": round(time.perf_counter() - start, 2),
        "train_accuracy": accuracy(model, x, target),
        "test_accuracy": accuracy(model, *_split(dataset_cfg, "test", t.n_test, device)),
        "n_test": int(t.n_test), "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    print(f"trained {model_cfg.name}: {info['train_seconds']:.0f} s, "
          f"train accuracy {info['train_accuracy']:.4f}, test accuracy {info['test_accuracy']:.4f} (n={t.n_test})")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        torch.save({"state_dict": model.state_dict(), "info": info}, f)
    os.replace(f.name, path)                                        # atomic: never a half-written cache
    return model.eval(), {**info, "checkpoint": str(path), "cached": False}
