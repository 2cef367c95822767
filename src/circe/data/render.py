"""Drawing: synthetic scenes, and words written onto an image (DQU-CIR's visual query).

Everything here is deterministic: the same inputs give the same pixels on every machine,
because the font is Pillow's bundled one (no system font lookup).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 195, 20),
    "purple": (135, 55, 180),
    "orange": (245, 125, 25),
}
SIZES = ("small", "large")
GRID = 3  # the scene is a GRID x GRID board; an object occupies one cell
POSITIONS = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
BACKGROUND = (238, 238, 232)


@dataclass(frozen=True, order=True)
class SceneObject:
    cell: int  # 0..8, row-major; first field so scenes sort by position
    shape: str
    colour: str
    size: str

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


Scene = tuple[SceneObject, ...]  # canonical form: sorted by cell, one object per cell


def canonical(objects: Sequence[SceneObject]) -> Scene:
    scene = tuple(sorted(objects))
    cells = [o.cell for o in scene]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {scene}")
    return scene


def render_scene(
    scene: Scene,
    size: int = 128,
    jitter_seed: str | None = None,
    palette: Mapping[str, tuple[int, int, int]] = COLOURS,
) -> Image.Image:
    """Draw a scene. `jitter_seed` shifts each object a little inside its cell, reproducibly.
    `palette` maps colour names to RGB (extra names draw off-palette shades)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    rng = random.Random(jitter_seed) if jitter_seed is not None else None
    for obj in scene:
        row, col = divmod(obj.cell, GRID)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        if rng is not None:
            cx += rng.uniform(-0.08, 0.08) * cell
            cy += rng.uniform(-0.08, 0.08) * cell
        r = (0.40 if obj.size == "large" else 0.22) * cell
        fill = palette[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            s = r * 0.86  # equal visual area to the circle, roughly
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")
    return image


@lru_cache(maxsize=64)
def bundled_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def write_words(
    image: Image.Image, words: str, band_fraction: float = 0.3, max_font_fraction: float = 0.22
) -> Image.Image:
    """Return a copy of `image` with `words` written across its lower part.

    DQU-CIR's vision-oriented unification writes the modification's key words onto the
    reference image so that one image encoder sees both. The text is black on a white
    box (high contrast whatever the picture), centred horizontally, in the lowest
    `band_fraction` of the image, and the font is the largest that fits the width,
    capped at `max_font_fraction` of the image height. Long texts wrap onto two lines.
    """
    words = " ".join(words.split())
    out = image.convert("RGB").copy()
    if not words:
        return out
    width, height = out.size
    draw = ImageDraw.Draw(out)
    band = height * band_fraction
    lines = _fit_lines(draw, words, width * 0.94, band, int(height * max_font_fraction))
    font, text_lines = lines
    line_boxes = [draw.textbbox((0, 0), line, font=font) for line in text_lines]
    line_height = max(b[3] - b[1] for b in line_boxes)
    block_height = line_height * len(text_lines) + 2 * (len(text_lines) - 1)
    top = height - block_height - max(2, height * 0.03)
    for line, box in zip(text_lines, line_boxes, strict=True):
        w = box[2] - box[0]
        left = (width - w) / 2
        pad = max(1, height // 64)
        draw.rectangle(
            (left - pad, top - pad, left + w + pad, top + line_height + pad), fill=(255, 255, 255)
        )
        draw.text((left - box[0], top - box[1]), line, font=font, fill=(0, 0, 0))
        top += line_height + 2
    return out


def _fit_lines(
    draw: ImageDraw.ImageDraw, words: str, max_width: float, max_height: float, max_size: int
) -> tuple[ImageFont.FreeTypeFont, list[str]]:
    """The largest font (and one or two lines) that fits the box; falls back to size 6."""
    tokens = words.split()
    candidates = [[words]]
    if len(tokens) > 1:  # also try the most balanced two-line split
        cut = min(
            range(1, len(tokens)),
            key=lambda i: abs(len(" ".join(tokens[:i])) - len(" ".join(tokens[i:]))),
        )
        candidates.append([" ".join(tokens[:cut]), " ".join(tokens[cut:])])
    for size in range(max(max_size, 6), 5, -1):
        font = bundled_font(size)
        for lines in candidates:
            boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
            fits_width = all(b[2] - b[0] <= max_width for b in boxes)
            fits_height = sum(b[3] - b[1] + 2 for b in boxes) <= max_height
            if fits_width and fits_height:
                return font, lines
    return bundled_font(6), candidates[-1]
