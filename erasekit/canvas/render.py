"""Deterministic procedural renderer of canvas images (one object painted in one style).

An object is a silhouette (a mask of polygons and holes, jittered in position, scale and
rotation); a style is a way to paint the silhouette's inside, the background and the outline
(palette, texture and stroke). Styles never tile over the silhouette, so every object stays
recognisable in every style: cross-domain retain accuracy is only meaningful that way.

Images are drawn at 4x the target size and box-filtered down, so edges are anti-aliased.
``render(obj, style, seed)`` gives the same pixels for the same arguments on every machine.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import OBJECTS, STYLES, check_label

SUPERSAMPLE = 4
Primitive = tuple[str, list[tuple[float, float]]]  # ("fill" | "hole", polygon in unit coordinates)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28, start: float = 0.0,
             stop: float = 2 * math.pi) -> list[tuple[float, float]]:
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a))
            for a in np.linspace(start, stop, n, endpoint=stop - start < 2 * math.pi)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _mirror(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(-x, y) for x, y in points]


def _wavy_band(x: float, phase: float) -> list[tuple[float, float]]:
    ys = np.linspace(-0.1, 0.85, 12)
    left = [(x - 0.05 + 0.08 * math.sin(3 * y * math.pi + phase), y) for y in ys]
    right = [(px + 0.1, py) for px, py in reversed(left)]
    return left + right


def _shape(obj: str) -> list[Primitive]:
    """Silhouette of an object in unit coordinates (x right, y down, roughly [-0.85, 0.85])."""
    F, H = "fill", "hole"
    if obj == "Architectures":
        return [(F, _rect(-0.55, -0.05, 0.55, 0.75)), (F, [(-0.75, 0.0), (0.0, -0.7), (0.75, 0.0)]),
                (H, _rect(-0.13, 0.3, 0.13, 0.75)), (H, _rect(0.25, 0.12, 0.42, 0.3))]
    if obj == "Butterfly":
        wing_up, wing_low = _ellipse(-0.4, -0.28, 0.36, 0.3), _ellipse(-0.3, 0.32, 0.26, 0.24)
        return [(F, wing_up), (F, _mirror(wing_up)), (F, wing_low), (F, _mirror(wing_low)),
                (F, _ellipse(0.0, 0.0, 0.08, 0.6))]
    if obj == "Cats":
        ear = [(-0.55, -0.05), (-0.48, -0.8), (-0.1, -0.35)]
        eye = _ellipse(-0.22, 0.08, 0.09, 0.07)
        return [(F, _ellipse(0.0, 0.2, 0.58, 0.5)), (F, ear), (F, _mirror(ear)),
                (H, eye), (H, _mirror(eye))]
    if obj == "Fishes":
        return [(F, _ellipse(-0.12, 0.0, 0.58, 0.34)), (F, [(0.3, 0.0), (0.85, -0.42), (0.85, 0.42)]),
                (H, _ellipse(-0.45, -0.07, 0.07, 0.07))]
    if obj == "Flame":
        body = _ellipse(0.0, 0.32, 0.45, 0.45, start=-0.25 * math.pi, stop=1.25 * math.pi)
        return [(F, body + [(-0.05, -0.35), (0.0, -0.85), (0.12, -0.3)]),
                (H, _ellipse(0.0, 0.42, 0.16, 0.2))]
    if obj == "Flowers":
        petals = [(F, _ellipse(0.36 * math.cos(a), -0.2 + 0.36 * math.sin(a), 0.2, 0.2))
                  for a in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
        return petals + [(F, _ellipse(0.0, -0.2, 0.2, 0.2)), (F, _rect(-0.05, 0.1, 0.05, 0.85)),
                         (F, _ellipse(0.2, 0.55, 0.18, 0.08))]
    if obj == "Human":
        return [(F, _ellipse(0.0, -0.6, 0.2, 0.2)),
                (F, [(-0.38, 0.45), (0.38, 0.45), (0.16, -0.38), (-0.16, -0.38)]),
                (F, _rect(-0.7, -0.32, 0.7, -0.18)), (F, _rect(-0.28, 0.4, -0.1, 0.88)),
                (F, _rect(0.1, 0.4, 0.28, 0.88))]
    if obj == "Jellyfish":
        dome = _ellipse(0.0, -0.05, 0.65, 0.62, start=math.pi, stop=2 * math.pi)
        return [(F, dome + [(0.65, 0.0), (-0.65, 0.0)])] + [
            (F, _wavy_band(x, i * 1.3)) for i, x in enumerate((-0.45, -0.15, 0.15, 0.45))]
    if obj == "Towers":
        merlons = [(F, _rect(x, -0.85, x + 0.14, -0.62)) for x in (-0.36, -0.07, 0.22)]
        return [(F, _rect(-0.24, -0.62, 0.24, 0.88)), (F, _rect(-0.36, -0.68, 0.36, -0.5))] + merlons + [
            (H, _rect(-0.07, -0.3, 0.07, -0.05)), (H, _rect(-0.1, 0.55, 0.1, 0.88))]
    if obj == "Trees":
        return [(F, [(-0.5, 0.0), (0.0, -0.85), (0.5, 0.0)]), (F, [(-0.68, 0.45), (0.0, -0.4), (0.68, 0.45)]),
                (F, _rect(-0.1, 0.4, 0.1, 0.88))]
    raise ValueError(f"no silhouette for object {obj!r}")


def _mask(obj: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Binary silhouette (size x size, float 0/1) with random placement jitter."""
    scale = size / 2 * 0.78 * rng.uniform(0.85, 1.08)
    angle = rng.uniform(-0.15, 0.15)
    cx, cy = size / 2 + rng.uniform(-0.06, 0.06) * size, size / 2 + rng.uniform(-0.06, 0.06) * size
    cos, sin = math.cos(angle), math.sin(angle)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for kind, poly in _shape(obj):
        pts = [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in poly]
        draw.polygon(pts, fill=255 if kind == "fill" else 0)
    return np.asarray(img, dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Texture helpers (all return float32 arrays in [0, 1]).

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    low = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _solid(size: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.float32), (size, size, 3)).copy()


def _jitter(rgb, rng: np.random.Generator, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, 3), 0, 1)


def _voronoi(rng: np.random.Generator, size: int, n: int, palette) -> np.ndarray:
    pts = rng.random((n, 2)) * size
    yy, xx = np.mgrid[0:size, 0:size]
    d = (xx[..., None] - pts[:, 0]) ** 2 + (yy[..., None] - pts[:, 1]) ** 2
    cell = d.argmin(-1)
    colors = np.stack([_jitter(palette[rng.integers(len(palette))], rng, 0.04) for _ in range(n)])
    return colors[cell]


def _tiles(rng: np.random.Generator, size: int, tile: int, palette, grout) -> np.ndarray:
    n = size // tile
    colors = np.stack([_jitter(palette[rng.integers(len(palette))], rng, 0.05) for _ in range(n * n)])
    img = colors.reshape(n, n, 3).repeat(tile, 0).repeat(tile, 1)
    img[::tile, :] = grout
    img[:, ::tile] = grout
    return img


def _strokes(rng: np.random.Generator, size: int, base, colors, n: int, length: float,
             width: int, curl: float) -> np.ndarray:
    img = Image.fromarray((_solid(size, _jitter(base, rng, 0.03)) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        x, y = rng.random(2) * size
        a = rng.uniform(0, 2 * math.pi)
        pts = []
        for _ in range(5):
            pts.append((x, y))
            x, y, a = x + length / 4 * math.cos(a), y + length / 4 * math.sin(a), a + curl
        col = tuple(int(c * 255) for c in _jitter(colors[rng.integers(len(colors))], rng, 0.05))
        draw.line(pts, fill=col, width=width)
    return np.asarray(img, dtype=np.float32) / 255.0


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    img = Image.fromarray((mask * 255).astype(np.uint8))
    grown = np.asarray(img.filter(ImageFilter.MaxFilter(2 * width + 1)), np.float32) / 255.0
    shrunk = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1)), np.float32) / 255.0
    return np.clip(grown - shrunk, 0, 1)


def _blur(arr: np.ndarray, radius: float) -> np.ndarray:
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Styles: each returns the painted image given the silhouette mask.

def _paint(style: str, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = mask.shape[0]
    m = mask[..., None]
    if style == "Cubism":
        bg = _voronoi(rng, s, 10, [(0.55, 0.42, 0.3), (0.65, 0.55, 0.42), (0.45, 0.35, 0.28)])
        fg = _voronoi(rng, s, 24, [(0.85, 0.62, 0.2), (0.45, 0.5, 0.25), (0.6, 0.6, 0.58), (0.75, 0.4, 0.15)])
        out, color = _outline(mask, 3)[..., None], (0.2, 0.12, 0.08)
        return (fg * m + bg * (1 - m)) * (1 - out) + out * np.asarray(color, np.float32)
    if style == "Mosaic":
        bg = _tiles(rng, s, 16, [(0.25, 0.5, 0.55), (0.35, 0.6, 0.6), (0.3, 0.45, 0.5)], (0.15, 0.15, 0.15))
        fg = _tiles(rng, s, 16, [(0.9, 0.3, 0.2), (0.95, 0.65, 0.15), (0.95, 0.85, 0.3)], (0.15, 0.15, 0.15))
        return fg * m + bg * (1 - m)
    if style == "Neon_Lines":
        bg = _solid(s, _jitter((0.06, 0.02, 0.1), rng, 0.02)) + 0.05 * _smooth_noise(rng, s, 6)[..., None]
        line = _outline(mask, 4)
        glow = _blur(line, 6)
        img = bg + glow[..., None] * np.asarray(_jitter((0.1, 0.9, 0.95), rng), np.float32)
        return img * (1 - line[..., None]) + line[..., None] * np.asarray(_jitter((1.0, 0.2, 0.85), rng), np.float32)
    if style == "On_Fire":
        ramp = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
        flicker = _smooth_noise(rng, s, 8)[..., None]
        bg = (1 - ramp) * np.asarray((0.05, 0.0, 0.0)) + ramp * np.asarray((0.55, 0.05, 0.02))
        fg = (1 - ramp) * np.asarray((1.0, 0.95, 0.3)) + ramp * np.asarray((0.95, 0.35, 0.05))
        fg = fg * (0.8 + 0.3 * flicker)
        return fg * m + (bg * (0.8 + 0.4 * flicker)) * (1 - m)
    if style == "Pencil_Drawing":
        paper = 0.88 + 0.06 * _smooth_noise(rng, s, 32)[..., None]
        yy, xx = np.mgrid[0:s, 0:s]
        hatch = ((xx + yy + rng.integers(0, 9)) % 9 < 3).astype(np.float32)[..., None]
        inside = paper * (1 - 0.55 * hatch)
        out = _outline(mask, 3)[..., None]
        img = (inside * m + paper * (1 - m)) * (1 - out) + out * 0.2
        return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
    if style == "Pop_Art":
        yy, xx = np.mgrid[0:s, 0:s]
        dots = (((xx % 12) - 6) ** 2 + ((yy % 12) - 6) ** 2 < 12).astype(np.float32)[..., None]
        bg = _solid(s, _jitter((1.0, 0.85, 0.1), rng, 0.03)) * (1 - dots) + dots * np.asarray((0.95, 0.2, 0.2))
        fg = _solid(s, _jitter((0.1, 0.35, 0.95), rng, 0.04))
        out = _outline(mask, 3)[..., None]
        return (fg * m + bg * (1 - m)) * (1 - out)
    if style == "Ukiyoe":
        yy, xx = np.mgrid[0:s, 0:s]
        waves = (np.sin(yy / 5.0 + 2.5 * np.sin(xx / 11.0) + rng.uniform(0, 6)) > 0.85).astype(np.float32)[..., None]
        bg = _solid(s, _jitter((0.93, 0.86, 0.7), rng, 0.03)) * (1 - 0.35 * waves)
        stripes = (np.sin(yy / 3.0) > 0.6).astype(np.float32)[..., None]
        fg = _solid(s, _jitter((0.1, 0.2, 0.45), rng, 0.03)) * (1 - stripes) + stripes * np.asarray((0.35, 0.5, 0.7))
        out = _outline(mask, 2)[..., None]
        return (fg * m + bg * (1 - m)) * (1 - out) + out * 0.05
    if style == "Van_Gogh":
        bg = _strokes(rng, s, (0.08, 0.15, 0.45), [(0.2, 0.32, 0.7), (0.45, 0.6, 0.9)],
                      140, 26, 4, 0.5)
        fg = _strokes(rng, s, (0.95, 0.7, 0.1), [(1.0, 0.85, 0.3), (0.85, 0.45, 0.05)], 140, 20, 4, 0.5)
        return fg * m + bg * (1 - m)
    if style == "Watercolor":
        paper = 0.95 + 0.04 * _smooth_noise(rng, s, 24)[..., None]
        soft = _blur(mask, 3.0)[..., None]
        blotch = _smooth_noise(rng, s, 5)[..., None]
        pigment = np.asarray(_jitter((0.92, 0.35, 0.62), rng, 0.05)) * (1 - blotch) + \
            np.asarray(_jitter((0.35, 0.5, 0.95), rng, 0.05)) * blotch
        wash = paper * (1 - soft) + soft * (0.1 * paper + 0.9 * pigment)
        return np.broadcast_to(wash, (s, s, 3))
    if style == "Winter":
        ramp = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
        bg = (1 - ramp) * np.asarray((0.7, 0.82, 0.95)) + ramp * np.asarray((0.88, 0.93, 1.0))
        fg = _solid(s, (0.98, 0.98, 1.0)) - 0.12 * _smooth_noise(rng, s, 6)[..., None]
        flakes = (rng.random((s, s)) < 0.012).astype(np.float32)
        flakes = _blur(flakes * 4, 1.0)[..., None].clip(0, 1)
        out = _outline(mask, 3)[..., None]
        img = (fg * m + bg * (1 - m)) * (1 - out) + out * np.asarray((0.25, 0.4, 0.65))
        return img * (1 - flakes) + flakes
    raise ValueError(f"no painter for style {style!r}")


def render(obj: str, style: str, seed: int, size: int = 32) -> Image.Image:
    """Render one canvas image as an RGB PIL image of ``size`` x ``size`` pixels.

    The same ``(obj, style, seed, size)`` always gives the same pixels.
    """
    obj = OBJECTS[check_label(obj, OBJECTS, "object")]
    style = STYLES[check_label(style, STYLES, "style")]
    rng = np.random.default_rng([seed, OBJECTS.index(obj), STYLES.index(style)])
    big = size * SUPERSAMPLE
    img = _paint(style, _mask(obj, big, rng), rng)
    img = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")
    return img.resize((size, size), Image.BOX)


def render_mask(obj: str, style: str, seed: int, size: int = 32) -> np.ndarray:
    """Where the object is in ``render(obj, style, seed, size)``: a size x size bool array (the silhouette
    drawn with the same random draws, box-filtered down like the image and thresholded at one half)."""
    obj = OBJECTS[check_label(obj, OBJECTS, "object")]
    style = STYLES[check_label(style, STYLES, "style")]
    rng = np.random.default_rng([seed, OBJECTS.index(obj), STYLES.index(style)])
    big = _mask(obj, size * SUPERSAMPLE, rng)
    return big.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3)) > 0.5


def render_batch(cells: list[tuple[int, int]], seeds: list[int], size: int = 32) -> np.ndarray:
    """Render (object index, style index) cells as a uint8 array N x size x size x 3."""
    return np.stack([np.asarray(render(OBJECTS[o], STYLES[s], seed, size))
                     for (o, s), seed in zip(cells, seeds)])
