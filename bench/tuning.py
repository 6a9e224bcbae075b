"""Pass sizes tuned to the model (issue 22): the images per inference pass and per gradient pass at which
the model runs fastest, for one input shape, device, thread count, precision and memory format.

probe() times the model on seeded inputs at batch sizes 1, 2, 4, ... (powers of two): inference
(torch.inference_mode) and the input gradient of one logit (as the gradient methods take it), on the
run's own thread count (torch.get_num_threads()) and the wall clock, the time a run waits for. First a
sweep times each size once: a direction stops when two sizes running did not beat its best throughput
(past MIN_SWEEP), at an out-of-memory error (the GPU's bound), at MAX_BATCH or MAX_INPUT_BYTES of inputs,
or at SWEEP_SHARE of its budget (sizes up to MIN_BUDGETED are always timed). Then rounds time the sizes
within half the best throughput again, interleaved, while the budget lasts, and each size keeps its
fastest call: another process's load only ever adds time, so the minimum is the model's own cost
(the CPU time read before instead counts OpenMP threads spinning while the other waits for a core:
two threads at load 8-9 read 5-200 images/s for small_cnn and picked 1-4 images). BUDGET_S: 1.2 s on
CPU, 3 s on a GPU, 40 % for inference and 60 % for gradients, which cost 2-3x as much per image. It
picks the largest size within TOLERANCE of the best: the curves are flat from 16-32 images on, and of
sizes that tie the larger is safer, a chunked pass having its own per-chunk overhead. tune() keeps the
result per key (architecture, input shape, device and threads, precision, channels_last, torch
version) in memory and in `pass_sizes.json` of the cache folder, so later runs skip the probe; a record
of another PROBE version is probed again. metrics.batching.pass_sizes() hands the sizes to every pass
given no explicit chunk size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from bench.checks import autocast
from bench.files import write_json
from metrics.batching import PassSizes, is_out_of_memory, pass_sizes

log = logging.getLogger(__name__)

BUDGET_S = {"cpu": 1.2, "cuda": 3.0}          # wall seconds for both directions (FORWARD_SHARE forward)
FORWARD_SHARE = 0.4
SWEEP_SHARE = 0.6                              # of a direction's budget for the first sweep; rounds the rest
PROBE = 5                                      # the probe's version: cached records of another are probed again
                                               # (1: two threads, CPU time, 1 s halved; 2: one thread, 1 s in
                                               # thirds; 3: 1.2 s, the raw best; 4: a 3-point median)
MAX_BATCH = {"cpu": 1024, "cuda": 4096}
MAX_INPUT_BYTES = {"cpu": 64 << 20, "cuda": 2 << 30}
TOLERANCE = 0.1                                # the largest size within 10% of the best (module docstring)
CONTENDER = 0.5                                # rounds retime the sizes within half the best throughput
MAX_ROUNDS = 8                                 # timings per size at most (the sweep's and the rounds')
MIN_SWEEP = 32                                 # sizes swept before a fall may stop it (budget permitting)
MIN_BUDGETED = 4                               # sizes swept whatever the budget: resnet18 at 224 px on CPU
                                               # stopped at 1 (0.74 of its best in pixel flipping); ~4 s once
MIN_TIME = 0.02                                # seconds of calls per timing (at least two calls)
CACHE_FILE = "pass_sizes.json"
_MEMO: dict[str, dict[str, Any]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds of the fastest of >= 2 calls of step() (repeated for MIN_TIME), on the wall clock."""
    times: list[float] = []
    while len(times) < 2 or sum(times) < MIN_TIME:
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(max(time.perf_counter() - t0, 1e-6))
    return min(times)


def _sweep(step_at: Callable[[int], Callable[[], Any]], device: torch.device, max_batch: int,
           budget: float) -> tuple[int, dict[int, float], int]:
    """The size picked, the throughput (images/s, from the fastest call) per power-of-two batch size, and
    the rounds timed (module docstring); `budget` in wall seconds."""
    fastest: dict[int, float] = {}                              # size -> seconds of its fastest call
    started, batch, last, stale = time.perf_counter(), 1, 0.0, 0
    while batch <= max_batch and (stale < 2 or batch <= MIN_SWEEP):
        spent = time.perf_counter() - started
        if batch > MIN_BUDGETED and spent + 2 * last > SWEEP_SHARE * budget:   # the next size costs ~2x the last
            break
        try:
            seconds = _fastest(step_at(batch), device)
        except Exception as e:                                      # noqa: BLE001 - only OOM is handled
            if not is_out_of_memory(e) or not fastest:
                raise
            del e
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        last = time.perf_counter() - started - spent
        best = max((b / t for b, t in fastest.items()), default=0.0)
        stale = 0 if batch / seconds > best else stale + 1
        fastest[batch] = seconds
        batch *= 2
    rounds = 1
    while rounds < MAX_ROUNDS:                                      # interleaved: each contender once per round
        best = max(b / t for b, t in fastest.items())
        again = [b for b, t in fastest.items() if b / t >= CONTENDER * best]
        cost = sum(max(2 * fastest[b], MIN_TIME) for b in again)    # a round's calls, at their best
        if time.perf_counter() - started + cost > budget:
            break
        for b in again:
            fastest[b] = min(fastest[b], _fastest(step_at(b), device))
        rounds += 1
    rates = {b: b / t for b, t in fastest.items()}
    best = max(rates.values())
    return max(b for b, r in rates.items() if r >= (1 - TOLERANCE) * best), rates, rounds


def pass_step(model: nn.Module, x: Tensor, *, backward: bool, device: torch.device,
              precision: str = "float32") -> Callable[[], None]:
    """One pass of the batch x through `model`, as a callable: inference (torch.inference_mode), or with
    `backward` the input gradient of the first output of each item (as the gradient methods take it),
    under the `precision` autocast. The probe and the benchmarks (bench.perf_tuning, bench.perf_floor) time it."""
    def step() -> None:
        if backward:
            with torch.enable_grad(), autocast(device, precision):
                xs = x.detach().requires_grad_()
                torch.autograd.grad(model(xs).reshape(len(x), -1)[:, 0].sum(), xs)
        else:
            with torch.inference_mode(), autocast(device, precision):
                model(x)
    return step


def probe(model: nn.Module, shape: tuple[int, ...], device: torch.device | str, *, precision: str = "float32",
          budget: float | None = None, max_batch: int | None = None) -> dict[str, Any]:
    """Time `model` on inputs (b, *shape) at b = 1, 2, 4, ... on the current thread count: the sizes picked
    ("forward", "backward"), the throughputs (images/s per size, fastest call), the rounds timed per direction
    and the probe's seconds. Model, inputs, RNG and threads are unchanged."""
    device = torch.device(device)
    kind = device.type if device.type in BUDGET_S else "cuda"
    budget = BUDGET_S[kind] if budget is None else budget
    item = 4 * int(torch.Size(shape).numel())
    limit = max(1, min(MAX_BATCH[kind] if max_batch is None else max_batch, MAX_INPUT_BYTES[kind] // item))
    bank = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0)).to(device)   # (8, C, H, W)

    def inputs(b: int) -> Tensor:
        return bank.repeat((b + 7) // 8, *[1] * len(shape))[:b]

    def forward(b: int) -> Callable[[], Any]:
        return pass_step(model, inputs(b), backward=False, device=device, precision=precision)

    def backward(b: int) -> Callable[[], Any]:
        return pass_step(model, inputs(b), backward=True, device=device, precision=precision)

    t0 = time.perf_counter()
    fwd, fwd_rates, fwd_rounds = _sweep(forward, device, limit, FORWARD_SHARE * budget)
    bwd, bwd_rates, bwd_rounds = _sweep(backward, device, limit, (1 - FORWARD_SHARE) * budget)
    return {"forward": fwd, "backward": bwd, "seconds": round(time.perf_counter() - t0, 3), "probe": PROBE,
            "threads": torch.get_num_threads(), "rounds": {"forward": fwd_rounds, "backward": bwd_rounds},
            "throughput": {"forward": {str(b): round(r, 1) for b, r in fwd_rates.items()},
                           "backward": {str(b): round(r, 1) for b, r in bwd_rates.items()}}}


def key(model: nn.Module, shape: tuple[int, ...], device: torch.device | str, *, precision: str = "float32",
        channels_last: bool = False) -> str:
    """What determines the sizes: the architecture (module tree and parameter shapes, not the weights), the
    input shape, the device (CPU: processor and threads; GPU: its name), precision, memory format, torch."""
    device = torch.device(device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}")
    arch = repr(model) + repr([tuple(p.shape) for p in model.parameters()])
    text = json.dumps([type(model).__qualname__, hashlib.sha256(arch.encode()).hexdigest(), list(shape),
                       device.type, where, precision, bool(channels_last), torch.__version__])
    return f"{type(model).__name__}-{'x'.join(map(str, shape))}-{device.type}-" + \
        hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(path: Path | None) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path is not None and path.exists() else {}
    except (OSError, ValueError):                               # unreadable or half-written: probe again
        return {}


def tune(model: nn.Module, shape: tuple[int, ...], device: torch.device | str, *, precision: str = "float32",
         channels_last: bool = False, cache_dir: str | Path | None = None,
         budget: float | None = None) -> tuple[PassSizes, dict[str, Any]]:
    """The model's pass sizes for inputs of `shape` (C, H, W): from this process's memory, else the cache
    folder's pass_sizes.json, else probe() (then stored in both). Returns them and the manifest's record."""
    shape, device = tuple(int(s) for s in shape), torch.device(device)
    k = key(model, shape, device, precision=precision, channels_last=channels_last)
    path = Path(cache_dir).expanduser() / CACHE_FILE if cache_dir is not None else None
    record, source = _MEMO.get(k), "memory"
    if record is None:
        record, source = _read(path).get(k), "cache"
    if not isinstance(record, dict) or record.get("probe") != PROBE or not all(
            isinstance(record.get(d), int) and record[d] >= 1 for d in ("forward", "backward")):
        record, source = probe(model, shape, device, precision=precision, budget=budget), "probe"
        log.info("pass sizes for %s: %d images per forward pass, %d per gradient pass (probed in %.2f s)", k,
                 record["forward"], record["backward"], record["seconds"])
        if path is not None:
            try:                                                 # a lost concurrent update only costs a probe
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json({**_read(path), k: record}, path)
            except OSError as e:
                log.warning("pass sizes not cached in %s (%s): later runs probe again", path, e.strerror or e)
    _MEMO[k] = record
    sizes = PassSizes(shape, device.type, record["forward"], record["backward"])
    return sizes, {**record, "key": k, "source": source, "precision": precision, "channels_last": channels_last}


def _channels_last(model: nn.Module) -> bool:
    w = next((p for p in model.parameters() if p.ndim == 4), None)
    return w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)


@contextmanager
def tuned(model: nn.Module | None, x: Tensor, *, cache_dir: str | Path | None = None) -> Iterator[PassSizes | None]:
    """metrics.batching.pass_sizes() tuned to `model` for x's items (bench.api's first use: probed once per
    key and process), under the autocast in force and the model's memory format. No model (a localization
    metric): nothing to tune, the block runs as it is."""
    if not isinstance(model, nn.Module):
        yield None
        return
    kind = x.device.type
    precision = next((name for name, dtype in _PRECISION_NAMES.items()
                      if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == dtype), "float32")
    sizes, _ = tune(model, tuple(x.shape[1:]), x.device, precision=precision, channels_last=_channels_last(model),
                    cache_dir=cache_dir)
    with pass_sizes(sizes):
        yield sizes


_PRECISION_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
