"""`circe demo`: a small synthetic gallery, a few composed queries, and a picture of each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from circe.data.render import bundled_font
from circe.data.synthetic import SynthConfig, load_synthetic, write_synthetic
from circe.data.types import CIRSplit
from circe.eval.evaluate import EvalResult, evaluate
from circe.methods.base import CIRMethod

DEMO_CONFIG = SynthConfig(seed=7, train=0, val=0, test=150, test_unseen=0)


@dataclass
class DemoQuery:
    query_id: str
    reference_id: str
    text: str
    target_id: str
    ranked_ids: list[str]
    ranked_scores: list[float]

    @property
    def target_rank(self) -> int | None:
        """1-based rank of the target among the kept results, None if not among them."""
        return (
            self.ranked_ids.index(self.target_id) + 1 if self.target_id in self.ranked_ids else None
        )


def build_demo_split(out: Path, progress=None) -> CIRSplit:
    root = write_synthetic(out / "synthetic", DEMO_CONFIG, progress)
    return load_synthetic(root, "test")


def pick_queries(split: CIRSplit, result: EvalResult, count: int) -> list[DemoQuery]:
    """One query per edit kind in turn, so the demo shows every kind of change."""
    by_kind: dict[str, list[int]] = {}
    for i, query in enumerate(split.queries):
        by_kind.setdefault(query.tags[0] if query.tags else "", []).append(i)
    order = [
        rows[n]
        for n in range(max(map(len, by_kind.values())))
        for rows in by_kind.values()
        if n < len(rows)
    ]
    picked = []
    for i in order[:count]:
        query = split.queries[i]
        picked.append(
            DemoQuery(
                query.query_id,
                query.reference_id,
                query.text,
                query.target_ids[0],
                result.ranked_ids[i],
                result.ranked_scores[i],
            )
        )
    return picked


def draw_query(split: CIRSplit, query: DemoQuery, top: int = 5, tile: int = 128) -> Image.Image:
    """Reference | modification text | top results (the target framed in green)."""
    gap, header = 8, 34
    width = tile * (top + 1) + gap * (top + 2) + 16
    sheet = Image.new("RGB", (width, tile + header + 2 * gap + 18), "white")
    draw = ImageDraw.Draw(sheet)
    font, small = bundled_font(14), bundled_font(11)
    draw.text((gap, gap), f'"{query.text}"', font=font, fill=(20, 20, 20))
    y = header + gap
    sheet.paste(split.gallery.open(query.reference_id).resize((tile, tile)), (gap, y))
    draw.text((gap, y + tile + 2), "reference", font=small, fill=(60, 60, 60))
    for n, (image_id, score) in enumerate(zip(query.ranked_ids[:top], query.ranked_scores)):
        x = gap * (n + 2) + 16 + tile * (n + 1)
        sheet.paste(split.gallery.open(image_id).resize((tile, tile)), (x, y))
        hit = image_id == query.target_id
        colour = (20, 160, 40) if hit else (200, 200, 200)
        draw.rectangle((x - 3, y - 3, x + tile + 2, y + tile + 2), outline=colour, width=3)
        label = f"#{n + 1}  score {score:.2f}" + ("  target" if hit else "")
        draw.text((x, y + tile + 2), label, font=small, fill=colour if hit else (60, 60, 60))
    return sheet


def run_demo(method: CIRMethod, out: Path, count: int = 6, progress=None):
    """Evaluate `method` on the demo gallery and draw `count` queries; returns (result, picks)."""
    out.mkdir(parents=True, exist_ok=True)
    split = build_demo_split(out, progress)
    result = evaluate(method, split, ks=(1, 5, 10))
    picks = pick_queries(split, result, count)
    for n, query in enumerate(picks, 1):
        draw_query(split, query).save(out / f"query-{n}.png")
    return split, result, picks
