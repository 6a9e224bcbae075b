"""What the suite asks of a dataset, written once (DESIGN, "Contracts"); tests/test_contracts.py checks it
for every conf/dataset YAML, and the runner refuses an object that lacks a member, naming it."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class BenchDataset(Protocol):
    """A dataset of one split, as the runner (bench/run.py) and the zoo (bench/zoo/train.py) use it.

    Item i (`dataset[i]`, 0 <= i < len) is a dict: x (C, H, W) float32 after the dataset's own
    normalisation (x_raw in [0, 1] - mean) / std, target () int64 class index in 0..num_classes-1,
    sample_id () int64, unique and stable across runs and n_samples, and, where the dataset has ground
    truth, mask (H, W) bool (all items or none). `tensors()` is the whole split at once, the same items
    stacked: x (N, C, H, W), target (N,), sample_id (N,), mask (N, H, W); the zoo trains on it. The
    constructor takes keyword-only `split` and `n_samples` (load_model rebuilds the training split).
    """

    name: str                                   # labels results and folders (conf/dataset/<name>.yaml)
    split: str
    n_samples: int                              # == len(dataset)
    num_classes: int
    mean: tuple[float, ...]                     # the normalisation: one number per channel
    std: tuple[float, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Tensor]: ...

    def tensors(self) -> dict[str, Tensor]: ...


@runtime_checkable
class FileDataset(BenchDataset, Protocol):
    """A dataset read from files: the runner puts `content_digest()` (a hash of the files' bytes) in every cell
    key, so a file replaced under the same name recomputes its cells (bench/data/folder.py)."""

    def content_digest(self, *, cache_dir: str | Path | None = None) -> str: ...


def members(protocol: type = BenchDataset) -> list[str]:
    """The members a protocol of this module declares, its bases' first: annotated attributes and methods."""
    own = [c for c in reversed(protocol.__mro__) if c.__module__ == __name__]
    return [k for c in own for k in (*c.__dict__.get("__annotations__", {}), *(
        k for k, v in vars(c).items() if inspect.isfunction(v) and k not in ("__init__", "__subclasshook__")))]


def missing_members(dataset: Any, protocol: type = BenchDataset) -> list[str]:
    """The members of `protocol` that `dataset` lacks (empty when it satisfies it)."""
    return [m for m in members(protocol) if not hasattr(dataset, m)]
