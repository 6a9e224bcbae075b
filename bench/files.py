"""File primitives of the result store: atomic writes readable under the user's umask, temporaries of dead
processes, the results folder's checks, and the one reader of run manifests.

Every file the suite writes goes through `write_atomic` (a temporary beside the target, fsync, rename), whose
temporary is created 0600 by `tempfile`; `write_atomic` gives it the mode a plain `open` would (0666 less the
umask: 0644 under umask 022) before the rename, so manifests, cells, reports and cached models are readable by
others exactly as the user's umask says.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from bench.checks import check_name

MANIFEST = "manifest.json"

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
# write_atomic's temporaries: .<name>.~<host>~<pid>~<random><suffix>, so a later process can tell a dead owner's
_TEMPORARY = re.compile(r"^\..+\.~(?P<host>[A-Za-z0-9-]+)~(?P<pid>\d+)~[^~]*$")


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it, then rename it over `path`: readers never
    see half a file, not even after a crash. The temporary's name carries this process's host and pid,
    so `remove_stale_temporaries` can clear it if the process is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.~{_HOST}~{os.getpid()}~", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, shared_mode())                               # mkstemp's 0600 -> what open() would give
        fsync_path(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                       # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporaries of `write_atomic` in `folder` whose process (on this host) is dead, e.g. the
    hidden `.<name>.png...` of a killed report; a live process's temporaries are left alone. Returns how many."""
    n = 0
    for p in Path(folder).glob(".*"):
        m = _TEMPORARY.match(p.name)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            n += 1
    return n


def shared_mode() -> int:
    """The mode a new file gets from a plain `open` under this process's umask: 0o666 & ~umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(obj: Any, path: Path) -> None:
    """Atomic, human-readable JSON write."""
    def dump(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
    write_atomic(path, dump)


def write_error_text(run_dir: Path, error: OSError) -> str:
    """One line for a run stopped by an OSError (a full disk above all), naming the results folder and the file."""
    what = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
    where = f" on {error.filename}" if error.filename else ""
    return f"results folder {str(run_dir)!r}: the run stopped{where}: {what} ({type(error).__name__}: {error})"


def check_writable(run_dir: Path) -> None:
    """Refuse, before any work, a results folder that cannot be created or written."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-check.")
        try:
            os.write(fd, b"0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ValueError(f"results folder {str(run_dir)!r} is not writable ({e.strerror or e}); "
                         "set results_dir to a folder you can write to") from e


def check_space(run_dir: Path, *, need_bytes: int) -> None:
    """Refuse, before the expensive part, a results folder on a disk with less than `need_bytes` free."""
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise ValueError(f"results folder {str(run_dir)!r} has {free / 2**20:.1f} MiB free, this run needs about "
                         f"{need_bytes / 2**20:.1f} MiB: free space or set results_dir to another disk")


# ---- the optional map cache (cache_maps: true) -------------------------------------------------
def map_path(run_dir: Path, method: str, key: str, start: int) -> Path:
    """Where the maps of one method's batch starting at sample `start` are cached; `key` hashes what fixes them."""
    return Path(run_dir) / "maps" / f"{method}__{key}" / f"{start:09d}.pt"


def write_maps(path: Path, maps: Tensor, ok: Tensor, errors: list[str]) -> None:
    """Cache one batch's maps (B, H, W), which rows are valid (B,) and each failed row's reason."""
    def save(tmp: Path) -> None:
        torch.save({"maps": maps.detach().cpu(), "ok": ok.cpu(), "errors": list(errors)}, tmp)
    write_atomic(path, save)


def read_maps(path: Path) -> tuple[Tensor, Tensor, list[str]] | None:
    """A cached batch (maps, ok, errors), or None when absent or unreadable (then it is recomputed).

    Read with weights_only=True: a cache file cannot run code.
    """
    if not path.exists():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return d["maps"], d["ok"], list(d["errors"])
    except Exception:                                             # noqa: BLE001 - a broken cache is a miss
        return None



def find_manifests(root: str | Path) -> list[Path]:
    """The manifests of the runs at or below `root` (a run folder or a folder of runs), sorted; a ValueError
    naming the fix when there is none."""
    root = Path(root)
    paths = [root / MANIFEST] if (root / MANIFEST).is_file() else sorted(root.rglob(MANIFEST)) if root.is_dir() else []
    if not paths:
        raise ValueError(f"no {MANIFEST} found below {str(root)!r}; run `python -m bench` first, "
                         "or pass the folder it wrote its results to")
    return paths


def read_manifest(path: Path) -> dict:
    """Parse one manifest and check what readers take from it: the keys they need, names that become
    file names (dataset, model, run_id), and the files it lists inside the manifest's folder."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}, column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(f"{path} is not valid JSON ({where}); it was cut off or edited: remove it or re-run "
                         "that run") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a run manifest (a JSON object); remove it or re-run that run")
    missing = [k for k in ("run_id", "dataset", "model", "cells") if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by `python -m bench`, remove or re-run it")
    for key in ("dataset", "model", "run_id"):
        try:
            if not isinstance(manifest[key], str):
                raise ValueError(f"{key} name {manifest[key]!r} cannot be used in a file name: it is not a string")
            check_name(key, manifest[key])
        except ValueError as e:
            raise ValueError(f"{path}: {e}; this manifest was not written by `python -m bench`, remove it") from None
    for relative in _listed(manifest):
        inside(path, relative, "cell")
    return manifest


def read_manifests(root: str | Path) -> Iterator[tuple[Path, dict]]:
    """(path, manifest) of every run at or below `root`, each read and checked by `read_manifest`."""
    for path in find_manifests(root):
        yield path, read_manifest(path)


def inside(manifest_path: Path, relative: str, what: str) -> Path:
    """The file `relative` that a manifest lists, refused when it lies outside the manifest's folder."""
    folder = Path(manifest_path).parent.resolve()
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder):
        raise ValueError(f"{manifest_path} lists the {what} file {relative!r}, outside its folder; remove the manifest")
    return path


def _listed(manifest: dict) -> Iterator[str]:
    for cell in manifest["cells"]:
        yield from (r for r in (cell.get("scores"), cell.get("curves")) if r)
