"""Pass sizes tuned to the model (issue 22): the images per inference pass and per gradient pass at which the
model runs fastest, for one input shape, device, thread count, precision and memory format.

probe() times the model on seeded inputs at batch sizes 1, 2, 4, ... (powers of two): inference
(torch.inference_mode) and the input gradient of one logit (as the gradient methods take it), on the run's own
thread count (torch.get_num_threads()). A sweep times each size once: a direction stops when two sizes running
did not beat its best throughput (past MIN_SWEEP), at an out-of-memory error (the GPU's bound), at MAX_BATCH
or MAX_INPUT_BYTES of inputs, or at SWEEP_SHARE of its budget (all of it on one CPU thread; sizes up to
MIN_BUDGETED are always timed; while the last doubling gained GROWTH, up to OVERRUN times that share,
since the run's every pass gains it too). Then rounds time the sizes within half the best throughput (after the median
below) again, interleaved, while the budget lasts, and each size keeps its fastest clean call: another
process's load only adds time, so the minimum is the model's own cost. The clock (_fastest): on several CPU
threads the wall clock, a call being clean when the process's threads waited for a core (Linux's schedstat)
under CLEAN_WAIT of it; on one thread its CPU time; on a GPU the wall clock. Two OpenMP threads on a loaded
machine wait at every barrier for the one without a core (2 cores at load 2.5: other_cnn's 16 images took 135
ms, nearly all of it waiting, against 10 ms on one thread), and their CPU time counts the spinning (at load
8-9 it read 5-200 images/s for small_cnn): where a size of the sweep has no clean call, or any has none after
the rounds, the direction is timed on one thread instead and the record, marked `contended`, is kept for the
process only, so that a quieter run times its own threads. It picks the largest size within TOLERANCE of the
best after a 3-point median over neighbouring sizes (the lower of two at the ends; the raw best once picked 8
images where 32-128 were best): of sizes that tie (the curves are flat from 16-32 images on) the larger is
safer, a chunked pass having its own per-chunk overhead. BUDGET_S: 1.2 s on CPU, 3 s on a GPU (of the probe's
clock), 40 % for inference and 60 % for gradients, which cost 2-3x as much per image. tune() keeps the result
per key (architecture, input shape, device and threads, precision, channels_last, torch version) in memory and
in `pass_sizes.json` of the cache folder, so later runs skip the probe; a record of another PROBE version is
probed again. metrics.batching.pass_sizes() hands the sizes to every pass given no explicit chunk size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
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

BUDGET_S = {"cpu": 1.2, "cuda": 3.0}          # clock() seconds for both directions (FORWARD_SHARE forward)
FORWARD_SHARE = 0.4
SWEEP_SHARE = 0.6                              # of a direction's wall-clock budget for the first sweep, rounds
                                               # the rest (one thread's CPU time needs no rounds: all of it)
PROBE = 6                                      # the probe's version: cached records of another are probed again
                                               # (1: two threads, CPU time, 1 s halved; 2: one thread, 1 s in
                                               # thirds; 3: 1.2 s, the raw best; 4: a 3-point median; 5: the
                                               # run's threads, clean calls; 6: GROWTH past the budget)
MAX_BATCH = {"cpu": 1024, "cuda": 4096}
MAX_INPUT_BYTES = {"cpu": 64 << 20, "cuda": 2 << 30}
TOLERANCE = 0.1                                # the largest size within 10% of the best (module docstring)
CLEAN_WAIT = 0.1                               # a call whose threads waited for a core longer is contended
CONTENDER = 0.5                                # rounds retime the sizes within half the best (3-point median)
MAX_ROUNDS = 8                                 # timings per size at most (the sweep's and the rounds')
MIN_SWEEP = 32                                 # sizes swept before a fall may stop it (budget permitting)
GROWTH, OVERRUN = 0.1, 4                       # past its budget, a sweep goes on while the last doubling
                                               # gained 10 % (TOLERANCE: it may move the pick), up to 4x the
                                               # budget: mobilenet_v3_small at 224 px on CPU gains 12-41 % per
                                               # doubling to 32 images; 1.2 s stopped its probe at 4-8 (0.56
                                               # of the best in pixel flipping)
MIN_BUDGETED = 4                               # sizes swept whatever the budget: resnet18 at 224 px on CPU
                                               # stopped at 1 (0.74 of its best in pixel flipping); ~4 s once
MIN_TIME = 0.02                                # seconds of calls per timing (at least two calls)
CACHE_FILE = "pass_sizes.json"
_MEMO: dict[str, dict[str, Any]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _waited() -> float:
    """Seconds this process's threads have spent runnable but waiting for a core (Linux's per-thread
    schedstat); 0.0 where the kernel does not say."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):               # a thread gone meanwhile, or no schedstat
            pass
    return total * 1e-9


def _several_threads(device: torch.device) -> bool:
    """Whether passes on `device` run on several CPU threads (timed on the wall clock, clean calls only)."""
    return device.type == "cpu" and torch.get_num_threads() > 1


def clock(device: torch.device) -> Callable[[], float]:
    """The probe's clock (_fastest): the calling thread's CPU time on one CPU thread, else the wall clock."""
    return time.thread_time if device.type == "cpu" and not _several_threads(device) else time.perf_counter


def _fastest(step: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Seconds of the fastest clean call (inf if none) and of the fastest call, of >= 2 calls of step()
    (repeated for MIN_TIME). On several CPU threads the wall clock, and a call is clean when the threads
    waited for a core for at most CLEAN_WAIT of it; on one thread its CPU time (all of the work, none of
    the wait), all clean; on a GPU the wall clock, all clean."""
    clean, fastest, total, calls = math.inf, math.inf, 0.0, 0
    several, now = _several_threads(device), clock(device)
    while calls < 2 or total < MIN_TIME:
        _sync(device)
        w0 = _waited() if several else 0.0
        t0 = now()
        step()
        _sync(device)
        seconds = max(now() - t0, 1e-6)
        waited = _waited() - w0 if several else 0.0
        fastest, total, calls = min(fastest, seconds), total + seconds, calls + 1
        if waited <= CLEAN_WAIT * seconds:
            clean = min(clean, seconds)
    return clean, fastest


def _median3(rates: dict[int, float]) -> dict[int, float]:
    """Each size's throughput as the median of it and its neighbours' (the lower of two at the ends)."""
    sizes = sorted(rates)
    near = [[rates[s] for s in sizes[max(0, i - 1):i + 2]] for i in range(len(sizes))]
    return {b: sorted(r)[1] if len(r) == 3 else min(r) for b, r in zip(sizes, near)}


def _sweep(step_at: Callable[[int], Callable[[], Any]], device: torch.device, max_batch: int,
           budget: float, *, give_up: bool = False) -> tuple[int, dict[int, float], int, int] | None:
    """The size picked, the throughput (images/s, from the fastest clean call, else the fastest) per
    power-of-two batch size, the rounds timed and the sizes with a clean call (module docstring);
    `budget` in seconds of clock(). With `give_up`, None as soon as a size has no clean call."""
    timed: dict[int, tuple[float, float]] = {}                  # size -> _fastest()

    def rate(b: int) -> float:
        clean, fastest = timed[b]
        return b / (clean if clean < math.inf else fastest)

    now = clock(device)
    sweep = SWEEP_SHARE if now is time.perf_counter else 1.0
    started, batch, last, stale = now(), 1, 0.0, 0
    while batch <= max_batch and (stale < 2 or batch <= MIN_SWEEP):
        spent = now() - started
        if batch > MIN_BUDGETED and spent + 2 * last > sweep * budget:   # the next size costs ~2x the last
            rising = len(timed) >= 2 and rate(batch // 2) >= (1 + GROWTH) * rate(batch // 4)
            if not rising or spent + 2 * last > OVERRUN * sweep * budget:
                break
        try:
            seconds = _fastest(step_at(batch), device)
            if give_up and seconds[0] == math.inf:                  # no clean call: contended
                return None
        except Exception as e:                                      # noqa: BLE001 - only OOM is handled
            if not is_out_of_memory(e) or not timed:
                raise
            del e
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        last = now() - started - spent
        best = max(map(rate, timed), default=0.0)
        timed[batch] = seconds
        stale = 0 if rate(batch) > best else stale + 1
        batch *= 2
    rounds = 1
    while rounds < MAX_ROUNDS:                                      # interleaved: each contender once per round
        smooth = _median3({b: rate(b) for b in timed})
        again = [b for b in timed if smooth[b] >= CONTENDER * max(smooth.values())]
        cost = sum(max(2 * b / rate(b), MIN_TIME) for b in again)  # a round's calls, at their best
        if now() - started + cost > budget:
            break
        for b in again:
            clean, fastest = _fastest(step_at(b), device)
            timed[b] = min(timed[b][0], clean), min(timed[b][1], fastest)
        rounds += 1
    rates = {b: rate(b) for b in timed}
    smooth = _median3(rates)
    best = max(smooth.values())
    pick = max(b for b, r in smooth.items() if r >= (1 - TOLERANCE) * best)
    return pick, rates, rounds, sum(clean < math.inf for clean, _ in timed.values())


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

    t0, threads, out = time.perf_counter(), torch.get_num_threads(), {}
    for name, step_at, share in (("forward", forward, FORWARD_SHARE), ("backward", backward, 1 - FORWARD_SHARE)):
        several = _several_threads(device)
        swept = _sweep(step_at, device, limit, share * budget, give_up=several)
        timed_threads = threads
        if swept is not None:
            pick, rates, rounds, clean = swept
        if several and (swept is None or clean < len(rates)):      # contended (module docstring)
            torch.set_num_threads(1)
            try:
                pick, rates, rounds, clean = _sweep(step_at, device, limit, share * budget)
            finally:
                torch.set_num_threads(threads)
            timed_threads = 1
        out[name] = pick, rates, rounds, clean, timed_threads
    return {"forward": out["forward"][0], "backward": out["backward"][0],
            "seconds": round(time.perf_counter() - t0, 3), "probe": PROBE, "threads": threads,
            "contended": any(o[4] != threads for o in out.values()),
            **{k: {d: o[i] for d, o in out.items()} for i, k in ((2, "rounds"), (3, "clean"), (4, "timed_threads"))},
            "throughput": {d: {str(b): round(r, 1) for b, r in o[1].items()} for d, o in out.items()}}


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
        if record["contended"]:                                  # not cached: a quieter run times its threads
            log.info("pass sizes for %s timed on one thread: the machine is loaded (other processes held the "
                     "cores the run's %d threads need); a later run probes again", k, record["threads"])
        elif path is not None:
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
