"""Streaming a dataset into batches for the runner: collation, checked by sample id, and one decode per run.

The runner reads the data 3 + (number of methods) times per run (a validation scan, the model
check, the probe, then once per method, methods in turn so that each method's cells are committed
together). `Batches` decodes each item once: its first full pass reads the dataset (`dataset[i]`,
where files are opened and decoded) and spools every collated batch to a private temporary folder
(`spool_dir`, default the system's, i.e. $TMPDIR); every later pass reads the spool back, bit for
bit the same tensors. One batch is in memory at a time, so memory stays flat in the number of
samples. The spool is bounded: a dataset whose decoded tensors would take more than SPOOL_BYTES, or
more than half the spool folder's free space (50,000 ImageNet images at 224 px are 30 GB of float32),
is not spooled, and neither is one whose spool cannot be written (a full disk): later passes read
the dataset again, as before, with a log line saying why.
"""
from __future__ import annotations

import logging
import operator
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SPOOL_BYTES = 4 << 30           # the most a run's spool of decoded batches may take on disk


def collate(items: list[Any], ids_hint: range, expect: dict[str, tuple] | None) -> dict[str, Tensor]:
    """Stack dataset items into a batch, refusing, by sample id, items of the wrong kind or shape."""
    out: dict[str, list[Tensor]] = {}
    for i, item in zip(ids_hint, items):
        if not isinstance(item, dict) or not {"x", "target", "sample_id"} <= set(item):
            raise ValueError(f"dataset item {i} must be a dict with x, target, sample_id (and mask), got "
                             f"{sorted(item) if isinstance(item, dict) else type(item).__name__}")
        try:
            sid = operator.index(item["sample_id"])                 # int, or a numpy / torch integer scalar
        except TypeError:
            raise ValueError(f"dataset item {i}: sample_id must be an integer, got {item['sample_id']!r}") from None
        x = item["x"]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 3:
            raise ValueError(f"sample_id {sid}: image x must be a float tensor (C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
                             f"{' ' + str(x.dtype) if isinstance(x, Tensor) else ''}")
        first = expect or {"x": tuple(x.shape), "mask": "mask" in item}
        if tuple(x.shape) != first["x"]:
            raise ValueError(f"sample_id {sid}: image has shape {tuple(x.shape)}, expected {first['x']} like the "
                             "dataset's other images; resize or drop it")
        if ("mask" in item) != first["mask"]:
            raise ValueError(f"sample_id {sid}: {'has' if 'mask' in item else 'lacks'} a mask, unlike the dataset's "
                             "other items")
        if first["mask"] and (not isinstance(item["mask"], Tensor) or tuple(item["mask"].shape) != first["x"][1:]):
            raise ValueError(f"sample_id {sid}: mask must have shape {first['x'][1:]}, got "
                             f"{tuple(getattr(item['mask'], 'shape', ()))}")
        target = torch.as_tensor(item["target"])
        if target.numel() != 1 or target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(f"sample_id {sid}: target must be one integer class index, got {item['target']!r}")
        expect = first
        for k, v in (("x", x), ("target", target.reshape(())), ("sample_id", torch.tensor(sid)),
                     *((("mask", item["mask"].bool()),) if first["mask"] else ())):
            out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def stream(dataset: Any, batch_size: int, device: torch.device, *, stop: int | None = None) -> Iterator[tuple[int, dict]]:
    """(start, batch) for consecutive batches; items are fetched on demand, one batch held at a time."""
    n = len(dataset) if stop is None else min(stop, len(dataset))
    expect = None
    for start in range(0, n, batch_size):
        span = range(start, min(n, start + batch_size))
        batch = collate([dataset[i] for i in span], span, expect)
        expect = expect or {"x": tuple(batch["x"].shape[1:]), "mask": "mask" in batch}
        yield start, {k: v.to(device) for k, v in batch.items()}


class Batches:
    """A dataset's batches for one run, each item decoded once (the module says how); a context manager
    that removes its spool on exit. `n` is the dataset's length, `batch_size` the batches' size."""

    def __init__(self, dataset: Any, batch_size: int, *, spool_dir: str | Path | None = None) -> None:
        self.dataset, self.batch_size, self.n = dataset, batch_size, len(dataset)
        self._spool_dir = spool_dir
        self._folder: Path | None = None                   # the spool, once a first full pass wrote it whole
        self._budget = 0                                   # bytes the spool may take (SPOOL_BYTES, half the free space)
        self.reads = 0                                     # passes over the dataset itself (for tests and logs)

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spool; later passes read the dataset again."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def stream(self, device: torch.device) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """(start, batch) of every batch on `device`: from the spool when there is one, else from the dataset
        (spooling it on the way)."""
        if self._folder is not None:
            for i, start in enumerate(range(0, self.n, self.batch_size)):
                batch = torch.load(self._folder / f"{i:06d}.pt", weights_only=True)
                yield start, {k: v.to(device) for k, v in batch.items()}
            return
        self.reads += 1
        folder: Path | None = None
        try:
            folder = Path(tempfile.mkdtemp(prefix="saliency-bench-batches-", dir=self._spool_dir))
            self._budget = min(SPOOL_BYTES, shutil.disk_usage(folder).free // 2)
        except OSError as e:
            log.warning("cannot create a folder to keep decoded batches in (%s): the dataset is read again on "
                        "every pass", e)
        try:
            for i, (start, batch) in enumerate(stream(self.dataset, self.batch_size, torch.device("cpu"))):
                folder = self._spool(folder, i, batch)
                yield start, {k: v.to(device) for k, v in batch.items()}
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        if folder is not None:                             # whole: the next pass reads it; removed by close()
            self._folder = folder                          # or, at the latest, when the object is collected
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)

    def head(self, n: int, device: torch.device) -> dict[str, Tensor]:
        """The first `n` samples as one batch (the same tensors as a batch of n would hold)."""
        parts: list[dict[str, Tensor]] = []
        for _, batch in self.stream(device):
            parts.append(batch)
            if sum(len(p["x"]) for p in parts) >= n:
                break
        return {k: torch.cat([p[k] for p in parts])[:n] for k in parts[0]}

    def _spool(self, folder: Path | None, i: int, batch: dict[str, Tensor]) -> Path | None:
        """Write batch i into `folder`; None (and no spool) once a write fails or the spool would outgrow its
        budget (SPOOL_BYTES, half the free space)."""
        if folder is None:
            return None
        if i == 0:                                         # the whole spool, estimated from the first batch
            need = sum(v.numel() * v.element_size() for v in batch.values()) * -(-self.n // self.batch_size)
            if need > self._budget:
                log.info("the decoded dataset would take %.2f GB, over the spool's budget of %.2f GB in %s: "
                         "the dataset is read again on every pass", need / 1e9, self._budget / 1e9, folder.parent)
                shutil.rmtree(folder, ignore_errors=True)
                return None
        try:
            torch.save(batch, folder / f"{i:06d}.pt")
            return folder
        except OSError as e:
            log.warning("cannot keep decoded batches in %s (%s): the dataset is read again on every pass", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            return None
