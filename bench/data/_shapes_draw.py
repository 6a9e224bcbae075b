"""Drawing the embedded `shapes` benchmark (bench/data/shapes.py): every random choice of an item
(`_draw`, per item, from its own generator) and the batched pixel work (`_render`, exact elementwise
operations only, so an item rendered alone is bit-identical to the same item rendered in a batch)."""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

CLASSES: tuple[str, ...] = ("disk", "square", "triangle", "cross", "ring", "star")
Split = Literal["train", "val", "test"]
_SPLIT_CODES: dict[str, int] = {"train": 1, "val": 2, "test": 3}   # mixed into every item's seed

# Geometry at the reference size of 64 px; lengths scale with size / 64.
_RADIUS = (9.0, 16.0)          # object bounding radius: every class fits in a circle of radius r
_BAR_LENGTH = (8.0, 14.0)      # distractor half-length
_BAR_WIDTH = (2.0, 3.5)        # distractor half-width
_CANDIDATES = 8                # distractor positions tried, the first clear of the object wins
# Appearance, in [0, 1] intensity.
_CONTRAST = 0.4                # object and distractor mean brightness = background's +- this
_WAVE_AMPLITUDE = 0.12         # peak of the smooth sinusoidal structure
_NOISE = (0.03, 0.07)          # std of the per-pixel Gaussian noise
_STAR_INNER = 0.5              # star inner-vertex radius, relative to the tip radius


# ---- inside-tests on rotated coordinates (u, v), in units of the bounding radius r ---------
# Only +, -, *, comparisons: IEEE-exact in any batch size, so an item rendered alone is
# bit-identical to the same item rendered in a batch (all trigonometry is done per item).
def _disk(u: Tensor, v: Tensor) -> Tensor:
    return u * u + v * v <= 0.8**2


def _square(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 1.0 / math.sqrt(2.0)      # corners on the circle


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    return (v >= -0.5) & (v <= 1.0 - math.sqrt(3.0) * u.abs())           # equilateral, inscribed


def _cross(u: Tensor, v: Tensor) -> Tensor:
    au, av = u.abs(), v.abs()
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))  # arm ends on the circle


def _ring(u: Tensor, v: Tensor) -> Tensor:
    rho2 = u * u + v * v
    return (rho2 >= 0.6**2) & (rho2 <= 1.0)


def _convex(u: Tensor, v: Tensor, corners: list[tuple[float, float]]) -> Tensor:
    """Inside a convex polygon whose corners run counter-clockwise."""
    inside = torch.ones_like(u, dtype=torch.bool)
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1]):
        inside &= (bx - ax) * v - (by - ay) * u >= (bx - ax) * ay - (by - ay) * ax
    return inside


_TIPS = [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + 2 * math.pi * k / 5 for k in range(5))]
_NOTCHES = [
    (_STAR_INNER * math.cos(a), _STAR_INNER * math.sin(a))
    for a in (math.pi / 2 + math.pi / 5 + 2 * math.pi * k / 5 for k in range(5))
]


def _star(u: Tensor, v: Tensor) -> Tensor:
    """Five-pointed star: the inner pentagon plus five spike triangles."""
    inside = _convex(u, v, _NOTCHES)
    for k in range(5):
        inside |= _convex(u, v, [_NOTCHES[k - 1], _TIPS[k], _NOTCHES[k]])  # counter-clockwise
    return inside


_INSIDE = (_disk, _square, _triangle, _cross, _ring, _star)              # indexed by label
_HEXAGON = [(math.cos(math.pi * k / 3), math.sin(math.pi * k / 3)) for k in range(6)]


def _hexagon(u: Tensor, v: Tensor) -> Tensor:
    return _convex(u, v, _HEXAGON)


def _ellipse(u: Tensor, v: Tensor) -> Tensor:
    return u * u + 4.0 * v * v <= 1.0                                    # axes 1 and 0.5


_DECOYS = (_hexagon, _ellipse)   # shapes_multi: objects like the class object, but of no class

# shapes_spurious: a 3x3-cell black-and-white watermark per class, row by row (1 = white); any two
# differ in >= 3 cells, so one flipped cell never turns one class's mark into another's.
_WATERMARKS = (
    (1, 0, 1, 0, 1, 0, 1, 0, 1),   # X
    (0, 1, 0, 1, 1, 1, 0, 1, 0),   # +
    (1, 1, 1, 1, 0, 0, 1, 0, 0),   # corner
    (1, 1, 1, 0, 0, 0, 1, 1, 1),   # =
    (1, 0, 1, 1, 0, 1, 1, 0, 1),   # ||
    (1, 1, 0, 1, 1, 0, 0, 0, 0),   # block
)
_MARK_CELL = 2.0                 # watermark cell side at 64 px: the mark is 6x6 px
_MARK_MARGIN = 2.0               # gap between the mark and the image border

# Area of each class relative to r**2 (for tests and docs): pixel counts match these closely.
_AREA = (
    math.pi * 0.8**2,                                   # disk     2.01
    2.0,                                                # square   2.00
    3.0 * math.sqrt(3.0) / 4.0,                         # triangle 1.30
    2 * (0.6 * 1.9) - 0.6**2,                           # cross    1.92
    math.pi * (1.0 - 0.6**2),                           # ring     2.01
    10 * 0.5 * _STAR_INNER * math.sin(math.pi / 5.0),   # star     1.47
)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates (y, x), each (H, W) float32; shared, never written to."""
    r = torch.arange(size, dtype=torch.float32)
    return r[:, None].expand(size, size), r[None, :].expand(size, size)


def _generator(seed: int, split_code: int, index: int) -> torch.Generator:
    """An item's own generator; SeedSequence gives a stable, well-mixed seed (hash() is salted)."""
    state = np.random.SeedSequence([seed, split_code, index]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _far(bg_lum: float, coin: float) -> float:
    """Object and distractor brightness: the background's +- _CONTRAST, kept in [0.05, 0.95]."""
    up, down = bg_lum + _CONTRAST <= 0.95, bg_lum - _CONTRAST >= 0.05
    return bg_lum + _CONTRAST if up and (not down or coin < 0.5) else bg_lum - _CONTRAST


def _colour(lum: float, chroma: list[float]) -> list[int]:
    """An RGB colour in 0..255 of mean brightness ~lum; chroma (3 numbers in [0, 1)) tints it."""
    return [round(255.0 * min(max(lum + 0.3 * (2.0 * c - 1.0), 0.0), 1.0)) for c in chroma]


def _own_generator(seed: int, split_code: int, index: int, stream: int) -> torch.Generator:
    """A second generator of an item for an optional feature, so switching it off changes nothing else."""
    state = np.random.SeedSequence([seed, split_code, index, stream]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _draw(seed: int, split_code: int, index: int, size: int, distractors: int, decoys: int = 0,
          watermark: bool = False, object_class: str = "label") -> dict[str, np.ndarray]:
    """Every random choice of one item, as small arrays; all trigonometry happens here, per item."""
    g = _generator(seed, split_code, index)
    k = size / 64.0
    # The draw order is fixed and distractors draw last, so distractors=0 and =1 give the same
    # background and object: a distractor only ever adds its own pixels.
    p = torch.rand(28, generator=g).tolist()
    noise = torch.randn(size, size, generator=g).numpy()                # (H, W), grey, std 1

    bg_lum = 0.3 + 0.4 * p[0]                                            # background mean in [0.3, 0.7]
    sigma = _NOISE[0] + (_NOISE[1] - _NOISE[0]) * p[1]
    r = k * (_RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * p[2])
    lo, hi = r + 1.0, size - 2.0 - r                                     # whole bounding circle inside
    cy, cx, theta = lo + (hi - lo) * p[3], lo + (hi - lo) * p[4], 2.0 * math.pi * p[5]
    colour = _colour(_far(bg_lum, p[6]), p[7:10])
    base = [255.0 * (bg_lum + 0.08 * (2.0 * t - 1.0)) for t in p[10:13]]  # tinted background, per channel
    tone = [255.0 * (0.5 + 0.5 * t) for t in p[13:16]]                  # colour of the smooth structure

    # Smooth structure: three plane waves of 0.5..3 cycles per image with amplitudes summing to
    # _WAVE_AMPLITUDE, written separably so the batch needs no trigonometry:
    # A sin(fx x + fy y + phi) = A sin(fx x + phi) cos(fy y) + A cos(fx x + phi) sin(fy y).
    w = np.array(p[16:28]).reshape(4, 3)                                 # frequency, direction, phase, amplitude
    freq = (0.5 + 2.5 * w[0]) * 2.0 * math.pi / size
    amp = (0.2 + w[3]) / (0.2 + w[3]).sum() * _WAVE_AMPLITUDE
    grid = np.arange(size)
    ax = np.outer(freq * np.cos(2.0 * math.pi * w[1]), grid) + 2.0 * math.pi * w[2, :, None]   # (3 waves, W)
    ay = np.outer(freq * np.sin(2.0 * math.pi * w[1]), grid)                                # (3 waves, H)
    wave_x = np.stack([np.sin(ax), np.cos(ax)]) * amp[:, None]           # (2, 3 waves, W)
    wave_y = np.stack([np.cos(ay), np.sin(ay)])                          # (2, 3 waves, H)

    bars, bar_colours = [], []
    for _ in range(distractors):   # an elongated ellipse, placed clear of the object where possible
        q = torch.rand(7 + 2 * _CANDIDATES, generator=g).tolist()
        a = k * (_BAR_LENGTH[0] + (_BAR_LENGTH[1] - _BAR_LENGTH[0]) * q[0])
        b = k * (_BAR_WIDTH[0] + (_BAR_WIDTH[1] - _BAR_WIDTH[0]) * q[1])
        dlo, dhi = a + 1.0, size - 2.0 - a
        spots = [(dlo + (dhi - dlo) * sy, dlo + (dhi - dlo) * sx) for sy, sx in zip(q[7::2], q[8::2])]
        gaps = [math.hypot(sy - cy, sx - cx) for sy, sx in spots]
        clear = [i for i, gap in enumerate(gaps) if gap >= r + a]
        dy, dx = spots[clear[0] if clear else gaps.index(max(gaps))]    # else the farthest spot
        c, s = math.cos(2.0 * math.pi * q[2]), math.sin(2.0 * math.pi * q[2])
        bars.append([dy, dx, c / a, s / a, c / b, s / b])
        bar_colours.append(_colour(_far(bg_lum, q[3]), q[4:7]))

    # Decoys (shapes_multi) draw from their own generator, so decoys=0 leaves every item bit-identical.
    decoy_rows, decoy_colours = [], []
    if decoys:
        gd = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, split_code, index, 1]).generate_state(
            1, dtype=np.uint64)[0]))
        placed = [(cy, cx, r)]
        for _ in range(decoys):    # a non-class object of the class object's size range, clear of the others
            q = torch.rand(7 + 2 * _CANDIDATES, generator=gd).tolist()
            rd = k * (_RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * q[0])
            dlo, dhi = rd + 1.0, size - 2.0 - rd
            spots = [(dlo + (dhi - dlo) * sy, dlo + (dhi - dlo) * sx) for sy, sx in zip(q[7::2], q[8::2])]
            gaps = [min(math.hypot(sy - py, sx - px) - pr - rd for py, px, pr in placed) for sy, sx in spots]
            dy, dx = spots[gaps.index(max(gaps))]                       # the spot farthest from the others
            angle = 2.0 * math.pi * q[1]
            decoy_rows.append([dy, dx, math.cos(angle) / rd, math.sin(angle) / rd, float(q[2] < 0.5)])
            decoy_colours.append(_colour(_far(bg_lum, q[3]), q[4:7]))
            placed.append((dy, dx, rd))

    # shapes_spurious: the watermark's corner and the object's class draw from their own generators.
    label = index % len(CLASSES)
    shape = label if object_class == "label" else int(torch.randint(
        len(CLASSES), (1,), generator=_own_generator(seed, split_code, index, 3)))
    mark = [-1.0, -1.0, 0.0]                                             # top, left, cell side (0: no mark)
    if watermark:
        cell = max(1.0, round(_MARK_CELL * k))
        near, far = max(1.0, round(_MARK_MARGIN * k)), size - max(1.0, round(_MARK_MARGIN * k)) - 3 * cell
        corner = int(torch.randint(4, (1,), generator=_own_generator(seed, split_code, index, 2)))
        mark = [far if corner >= 2 else near, far if corner % 2 else near, cell]

    f32 = np.float32
    return {
        "label": np.array(label, dtype=np.int64),
        "shape": np.array(shape, dtype=np.int64),                        # the object's class
        "mark": np.array(mark, dtype=f32),
        "base": np.array(base, dtype=f32),                               # (3,) 0..255
        "tone": np.array(tone, dtype=f32),                               # (3,) 0..255
        "noise": (255.0 * sigma * noise).astype(f32),                    # (H, W) 0..255
        "wave_x": wave_x.astype(f32), "wave_y": wave_y.astype(f32),
        # centre y, x; rotation cos / r, sin / r; bounding radius r
        "object": np.array([cy, cx, math.cos(theta) / r, math.sin(theta) / r, r], dtype=f32),
        "colour": np.array(colour, dtype=np.uint8),                      # (3,)
        "bars": np.array(bars, dtype=f32).reshape(distractors, 6),       # centre y, x; cos/a, sin/a, cos/b, sin/b
        "bar_colours": np.array(bar_colours, dtype=np.uint8).reshape(distractors, 3),
        # centre y, x; rotation cos / r, sin / r; which decoy shape (0 hexagon, 1 ellipse)
        "decoys": np.array(decoy_rows, dtype=f32).reshape(decoys, 5),
        "decoy_colours": np.array(decoy_colours, dtype=np.uint8).reshape(decoys, 3),
    }


def _render(
    seed: int, split: str, indices: range | list[int], size: int, distractors: int, decoys: int = 0,
    watermark: bool = False, object_class: str = "label",
) -> dict[str, Tensor]:
    """Render items in one batch: image (N, 3, H, W) uint8, mask (N, H, W), label (N,), extras.

    Random choices and trigonometry are per item (_draw); the pixel work here uses only
    +, -, *, comparisons and rounding, which are exact elementwise, so an item's pixels do
    not depend on its batch-mates: render_shapes_item matches the dataset bit for bit.
    """
    draws = [_draw(seed, _SPLIT_CODES[split], i, size, distractors, decoys, watermark, object_class) for i in indices]
    d = {key: torch.from_numpy(np.stack([item[key] for item in draws])) for key in draws[0]}
    n = len(draws)
    yy, xx = _grid(size)                                                 # (H, W) each

    # Background: tinted grey + coloured smooth structure + grey noise, in 0..255, then quantised.
    wx, wy = d["wave_x"], d["wave_y"]                                    # (N, 2, 3 waves, S)
    waves = wy[:, 0, :, :, None] * wx[:, 0, :, None, :] + wy[:, 1, :, :, None] * wx[:, 1, :, None, :]
    field = waves[:, 0] + waves[:, 1] + waves[:, 2]                      # (N, H, W), |field| <= amplitude
    image = d["base"][:, :, None, None] + d["tone"][:, :, None, None] * field[:, None]   # (N, 3, H, W)
    image = (image + d["noise"][:, None]).clamp(0.0, 255.0).round().to(torch.uint8)

    def local(cy: Tensor, cx: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Coordinates about per-item centres, rotated and scaled; (N, H, W) each."""
        dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
        cos, sin = cos[:, None, None], sin[:, None, None]
        return cos * dx + sin * dy, cos * dy - sin * dx

    # Distractors first, then the object on top: the mask is exactly the object's pixels.
    seen = torch.zeros(n, size, size, dtype=torch.bool)
    for j in range(distractors):
        cy, cx, ca, sa, cb, sb = d["bars"][:, j].unbind(1)               # (N,) each
        dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
        u = ca[:, None, None] * dx + sa[:, None, None] * dy              # along the bar, / half-length
        v = cb[:, None, None] * dy - sb[:, None, None] * dx              # across the bar, / half-width
        bar = u * u + v * v <= 1.0                                       # (N, H, W)
        image = torch.where(bar[:, None], d["bar_colours"][:, j, :, None, None], image)
        seen |= bar

    decoyed = torch.zeros(n, size, size, dtype=torch.bool)
    for j in range(decoys):                                              # painted under the class object
        cy, cx, ca, sa, kind = d["decoys"][:, j].unbind(1)               # (N,) each
        u, v = local(cy, cx, ca, sa)
        shape = torch.where(kind[:, None, None] > 0.5, _ellipse(u, v), _hexagon(u, v))
        image = torch.where(shape[:, None], d["decoy_colours"][:, j, :, None, None], image)
        decoyed |= shape

    o = d["object"]                                                      # (N, 5)
    u, v = local(o[:, 0], o[:, 1], o[:, 2], o[:, 3])
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    for label, inside in enumerate(_INSIDE):
        rows = (d["shape"] == label).nonzero().squeeze(1)
        if rows.numel():
            mask[rows] = inside(u[rows], v[rows])
    image = torch.where(mask[:, None], d["colour"][:, :, None, None], image)

    # Watermark (shapes_spurious), painted last: 3x3 cells of black (0) or white (255) in a corner.
    top, left, cell = (c[:, None, None] for c in d["mark"].unbind(1))    # (N, 1, 1) each
    row, col = ((yy - top) / cell.clamp_min(1.0)).floor(), ((xx - left) / cell.clamp_min(1.0)).floor()
    marked = (cell > 0) & (row >= 0) & (row < 3) & (col >= 0) & (col < 3)                     # (N, H, W)
    code = torch.tensor(_WATERMARKS, dtype=torch.uint8)[d["label"]]                           # (N, 9)
    bit = code.gather(1, (3 * row + col).clamp(0, 8).long().flatten(1)).view(n, size, size)   # (N, H, W)
    image = torch.where(marked[:, None], (255 * bit)[:, None], image)
    return {
        "image": image,                                                  # (N, 3, H, W) uint8
        "mask": mask,                                                    # (N, H, W) bool
        "label": d["label"],                                             # (N,) int64
        "colour": d["colour"],                                           # (N, 3) uint8, the object's
        "centre": o[:, :2],                                              # (N, 2) object centre y, x in px
        "rotation": o[:, 2:4] * o[:, 4:5],                               # (N, 2) cos, sin of its angle
        "radius": o[:, 4],                                               # (N,) bounding radius, px
        "distractor_mask": seen & ~mask,                                 # (N, H, W) visible distractor pixels
        "distractor_colour": d["bar_colours"],                           # (N, distractors, 3) uint8
        "decoy_mask": decoyed & ~mask,                                   # (N, H, W) visible decoy pixels
        "watermark_mask": marked,                                        # (N, H, W) the watermark's pixels
        "object_mask": mask & ~marked,                                   # (N, H, W) visible object pixels
        "shape": d["shape"],                                             # (N,) the object's class
    }
