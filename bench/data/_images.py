"""Reading the files of a dataset safely, and hashing them for the cell keys (bench/data/folder.py).

Every file is read through `open_file`: a path is resolved and refused unless it lies inside one
of the dataset's roots (a symlink is followed only when its target does too, so a link to
/etc/passwd or to another user's data is never read) and is a regular file (a directory named
x.png, a FIFO or a device is refused, and a FIFO is never opened, so it cannot block the run).
Images are decoded only as PNG or JPEG, whatever the suffix (PIL's other decoders, e.g. EPS
through Ghostscript, never see our files), at most `PIL.Image.MAX_IMAGE_PIXELS` pixels (PIL's
decompression-bomb limit, read at each call), and fully, so a truncated or corrupt file fails
here. Every refusal is a ValueError naming the file and what to do; nothing is skipped.

`file_hashes` gives the sha256 of each file's bytes, cached by the file's (size, mtime_ns,
ctime_ns, inode) in one JSON file per dataset root under the cache folder: an unchanged file is not
read again, and a file rewritten under the same name (even `cp -p`, which keeps the mtime, but
cannot keep the ctime) is. A file changed less than RACY_NS before it was hashed is not cached
(git's "racy clean" rule: a second write within the clock's granularity could keep its times).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

try:                                                     # refuses entity expansion in untrusted XML
    from defusedxml.ElementTree import parse as _parse_xml
except ImportError:                                      # expat >= 2.4.1 limits entity amplification
    from xml.etree.ElementTree import parse as _parse_xml

log = logging.getLogger(__name__)

FORMATS = ("PNG", "JPEG", "MPO")            # decoders tried, by content; MPO: a camera's JPEG with a 2nd picture
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grey (older Pillow reads such PNGs as "I")
RACY_NS = 2_000_000_000                     # files changed this recently are hashed again next time
_CACHE_VERSION = 1
Box = tuple[float, float, float, float]                   # x0, y0, x1, y1: pixel edges of the original image


def resolve_roots(*roots: Path) -> tuple[Path, ...]:
    """The dataset's folders (and explicitly configured files) with symlinks resolved: what may be read."""
    return tuple(Path(r).expanduser().resolve() for r in roots)


def inside(path: Path, roots: Sequence[Path]) -> Path:
    """`path` with symlinks resolved; ValueError unless it lies inside one of `roots` and is a regular file."""
    return _checked(path, roots)[0]


def _checked(path: Path, roots: Sequence[Path]) -> tuple[Path, os.stat_result]:
    """`inside`, with the resolved file's stat (only stat, never open: a FIFO cannot block here)."""
    try:
        real = Path(path).resolve(strict=True)
        st = real.stat()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist{' (a broken symlink)' if Path(path).is_symlink() else ''}; "
                         "restore it or remove the entry that names it") from None
    except (OSError, RuntimeError) as e:                     # a symlink loop, a permission error
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {e}); replace it with a readable file") from e
    if not any(real == r or real.is_relative_to(r) for r in roots):
        how = f"resolves (through a symlink) to {real}, which lies" if real != Path(path).absolute() else "lies"
        raise ValueError(f"{path} {how} outside the dataset root {roots[0]}: links are followed only inside it; "
                         "copy the file into the root, or set dataset.root to a folder that holds both")
    if not stat.S_ISREG(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "special file"
        raise ValueError(f"{path} is a {kind}, not a regular file; remove or rename it")
    return real, st


@contextmanager
def open_file(path: Path, roots: Sequence[Path]) -> Iterator[IO[bytes]]:
    """`path` opened for reading after `inside`; the opened file is checked again (swapped since?)."""
    real = inside(path, roots)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as e:
        raise ValueError(f"cannot open {path} ({type(e).__name__}: {e})") from e
    f = os.fdopen(fd, "rb")
    with f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file; remove or rename it")
        yield f


def load_image(path: Path, roots: Sequence[Path], what: str = "image") -> Image.Image:
    """The decoded image at `path` (PNG or JPEG), checked as the module says; `what` names it in errors."""
    fix = "replace or remove the file (it must be a PNG or JPEG image)"
    with open_file(path, roots) as f:
        try:
            with warnings.catch_warnings():                  # PIL warns above the limit; we refuse instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(f, formats=FORMATS)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{what} {path} is too large to decode safely ({e}); downscale it") from None
        except Exception as e:                               # noqa: BLE001 - any undecodable file
            raise ValueError(f"cannot read {what} {path}: not a PNG or JPEG image ({type(e).__name__}: {e}); "
                             f"{fix}") from None
        w, h = image.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and w * h > limit:
            raise ValueError(f"{what} {path} is {w}x{h} = {w * h} pixels, more than PIL.Image.MAX_IMAGE_PIXELS = "
                             f"{limit} (a guard against decompression bombs); downscale it")
        try:
            image.load()                                     # decoded now: the pixels outlive the file
        except Exception as e:                               # noqa: BLE001 - truncated or corrupt data
            raise ValueError(f"cannot read {what} {path}: {image.format} data is truncated or corrupt "
                             f"({type(e).__name__}: {e}); {fix}") from None
    return image


def rgb_resized(image: Image.Image, size: tuple[int, int], crop: tuple[int, int, int, int], path: Path) -> np.ndarray:
    """`image` resized (bilinear, antialiased) and cropped: uint8 (S, S, 3), or float32 in [0, 1] for
    16-bit grey, which is scaled by its bit depth (v / 65535; PNG stores samples at the full 16-bit range)."""
    if image.mode not in SIXTEEN_BIT:
        return np.asarray(image.convert("RGB").resize(size, Image.BILINEAR).crop(crop))
    v = np.asarray(image)
    if v.min(initial=0) < 0 or v.max(initial=0) > 65535:     # only mode "I" can hold these
        raise ValueError(f"image {path} has {image.mode} values in {v.min()}..{v.max()}, outside the 16-bit "
                         "range 0..65535; save it as 8- or 16-bit PNG")
    grey = Image.fromarray((v / 65535).astype(np.float32), "F").resize(size, Image.BILINEAR).crop(crop)
    return np.repeat(np.asarray(grey)[..., None], 3, axis=2)  # (S, S, 3)


def xml_objects(path: Path, origin: int, roots: Sequence[Path]) -> list[tuple[str, Box]]:
    """(name, box) of every <object> of a Pascal VOC-format XML file; corners are inclusive pixel
    indices counted from `origin` (1 in the VOC devkit, 0 in ImageNet's files), turned into edges."""
    with open_file(path, roots) as f:
        data = f.read()
    try:
        objects = _parse_xml(io.BytesIO(data)).getroot().findall("object")
        out = []
        for obj in objects:
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            out.append((obj.findtext("name").strip(), (xmin - origin, ymin - origin, xmax - origin + 1, ymax - origin + 1)))
    except Exception as e:                                   # noqa: BLE001 - any malformed file
        raise ValueError(f"cannot read boxes from {path} ({type(e).__name__}: {e}); expected Pascal VOC XML "
                         "with <object><name>..</name><bndbox><xmin>..</xmin>...</bndbox></object>") from e
    return out


def _sha256(f: IO[bytes]) -> str:
    return hashlib.file_digest(f, "sha256").hexdigest()


def file_hashes(paths: Sequence[Path], roots: Sequence[Path], cache_dir: str | Path | None) -> dict[Path, str]:
    """sha256 of each file's bytes, reading only files whose (size, mtime_ns, ctime_ns, inode) changed since
    they were cached in cache_dir/content/<hash of the roots>.json (cache_dir None: every file is read)."""
    cache = None
    if cache_dir is not None:
        where = hashlib.sha256("\n".join(map(str, roots)).encode()).hexdigest()[:16]
        cache = Path(str(cache_dir)).expanduser() / "content" / f"{where}.json"
    known = _read_cache(cache)
    out: dict[Path, str] = {}
    now, read, t0 = time.time_ns(), 0, time.perf_counter()
    for path in paths:
        real, st = _checked(path, roots)
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = known.get(str(real))
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == sig:
            out[path] = entry[4]
            continue
        with open_file(path, roots) as f:
            st = os.fstat(f.fileno())                        # the times of the bytes actually read
            out[path] = _sha256(f)
        read += 1
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        if now - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
            known[str(real)] = [*sig, out[path]]
        else:
            known.pop(str(real), None)
    if read and cache is not None:
        _write_cache(cache, known)
    log.info("content of %d files: %d read and hashed, %d from the hash cache (%.2f s)", len(out), read,
             len(out) - read, time.perf_counter() - t0)
    return out


def _read_cache(cache: Path | None) -> dict[str, list]:
    if cache is None or not cache.is_file():
        return {}
    try:
        data = json.loads(cache.read_text())
        return data["files"] if data.get("version") == _CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring the unreadable hash cache %s (%s); files are hashed again", cache, e)
        return {}


def _write_cache(cache: Path, files: dict[str, list]) -> None:
    """Written to a private temporary file and renamed, so concurrent runs never see a partial file."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "files": files}))
        os.replace(tmp, cache)
    except OSError as e:                                     # a read-only cache only costs re-reading next time
        tmp.unlink(missing_ok=True)
        log.warning("cannot write the hash cache %s (%s); files will be hashed again next run", cache, e)
