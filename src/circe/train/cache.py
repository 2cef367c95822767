"""Frozen-backbone feature cache: compute each image's and text's features once, keep them.

Layout: `<cache_dir>/<key>/features.safetensors` (`features`: `[N, D]` float32, row i for
item i) + `meta.json` (what the key was made of, for people and for checking). The key is
the sha256 of: the backbone identity (`short()` and the full weights sha256), a fingerprint
of the image preprocessing, what is cached (pooled image or text embeddings), and the items
themselves (image ids + file path, size and mtime; or the texts), so any change to any of
them is a miss rather than a stale hit. Entries are written to a temporary directory and
renamed into place, so a reader never sees a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from circe.backbones.base import Backbone
from circe.data.batching import image_batches
from circe.data.types import Gallery
from circe.methods.base import FrozenBackboneMethod
from circe.progress import Progress
from circe.train.atomic import fsync_path

FORMAT_VERSION = 1


def _sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def preprocess_fingerprint(backbone: Backbone) -> dict[str, str]:
    """How images become pixels: the transform's repr when it has a stable one (readable in
    meta.json) and a hash of the pixels it makes of a fixed probe image (catches the rest)."""
    probe = Image.linear_gradient("L").resize((97, 61)).convert("RGB")  # not square on purpose
    pixels = backbone.preprocess(probe).contiguous()
    transform = getattr(backbone, "_preprocess", None)
    return {
        "transform": repr(transform) if transform is not None else type(backbone).__name__,
        "probe_sha256": hashlib.sha256(pixels.numpy().tobytes()).hexdigest(),
    }


def image_items(gallery: Gallery, ids: Sequence[str]) -> list[list]:
    """(id, path, size, mtime_ns) per image: a changed file changes the key."""
    items = []
    for image_id in ids:
        path = gallery.paths[image_id]
        stat = path.stat()
        items.append([image_id, str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return items


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, backbone: Backbone, what: str, items: list) -> tuple[str, dict]:
        fields = {
            "format": FORMAT_VERSION,
            "backbone": backbone.identity.short(),
            "weights_sha256": backbone.identity.weights_sha256,
            "preprocess": preprocess_fingerprint(backbone),
            "what": what,
            "items_sha256": _sha256(items),
            "count": len(items),
        }
        return _sha256(fields), fields

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> torch.Tensor | None:
        """The cached `[N, D]` features, or None when there is no complete entry."""
        entry = self.path(key)
        if not (entry / "meta.json").is_file():
            return None
        meta = json.loads((entry / "meta.json").read_text())
        features = load_file(str(entry / "features.safetensors"))["features"]
        if features.shape[0] != meta["count"]:
            raise ValueError(f"feature cache entry {entry} is corrupt; delete that directory")
        return features

    def store(self, key: str, fields: dict, features: torch.Tensor) -> None:
        """Write an entry atomically: a temporary directory, fsynced, renamed into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            save_file({"features": features.contiguous()}, str(staging / "features.safetensors"))
            (staging / "meta.json").write_text(json.dumps(fields, indent=2))
            for name in ("features.safetensors", "meta.json"):
                fsync_path(staging / name)
            try:
                os.rename(staging, self.path(key))
            except OSError:
                if not (self.path(key) / "meta.json").is_file():
                    raise
                # Another process stored the same entry first: same key, same content.
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@torch.no_grad()
def compute_image_features(
    method: FrozenBackboneMethod,
    gallery: Gallery,
    ids: Sequence[str],
    batch_size: int,
    workers: int,
    progress: Progress,
) -> torch.Tensor:
    """`[N, D]` backbone image features of `ids`, in order (float32, on the CPU)."""
    backbone = method.backbone
    batches = image_batches(gallery, ids, backbone.preprocess, batch_size, workers)
    total = -(-len(ids) // batch_size)
    return torch.cat(
        [
            method.backbone_image_features(b.to(backbone.device)).float().cpu()
            for b in progress(batches, total, "caching image features")
        ]
    )


def prepared_query_items(gallery: Gallery, pairs, method: FrozenBackboneMethod) -> list:
    """What each pair's prepared query is made of: its reference image (as `image_items`),
    its text and its query id (what the raw-data stage depends on besides goes into the
    `what` of the key: `prepared_query_what`)."""
    references = [pairs.images[r] for r in pairs.reference.tolist()]
    images = image_items(gallery, references)
    texts = [pairs.texts[t] for t in pairs.text.tolist()]
    ids = pairs.query_ids or [None] * len(pairs)
    return [[i, t, q] for i, t, q in zip(images, texts, ids, strict=True)]


def prepared_query_what(method: FrozenBackboneMethod) -> str:
    return "query-image:prepared " + json.dumps(method.prepare_fingerprint(), sort_keys=True)


@torch.no_grad()
def compute_prepared_queries(
    method: FrozenBackboneMethod,
    pairs,
    batch_size: int,
    workers: int,
    progress: Progress,
    features: bool = True,
) -> tuple[torch.Tensor | None, list[str]]:
    """Every pair's query through `method.prepare_query`: (`[P, D]` backbone image features of
    the prepared images, or None without `features`; the P prepared texts)."""
    from torch.utils.data import DataLoader

    from circe.train.data import PreparedPairQueries

    backbone = method.backbone
    loader = DataLoader(
        PreparedPairQueries(pairs, backbone.preprocess, method.prepare_query),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=lambda items: tuple(zip(*items, strict=True)),
    )
    total = -(-len(pairs) // batch_size)
    rows, texts = [], []
    for pixels, batch_texts in progress(loader, total, "preparing queries"):
        texts += batch_texts
        if features:
            batch = torch.stack(pixels).to(backbone.device)
            rows.append(method.backbone_image_features(batch).float().cpu())
    return (torch.cat(rows) if features else None), texts


@torch.no_grad()
def compute_text_features(
    method: FrozenBackboneMethod, texts: Sequence[str], batch_size: int, progress: Progress
) -> torch.Tensor:
    """`[T, D]` backbone text features of `texts`, in order (float32, on the CPU)."""
    chunks = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return torch.cat(
        [
            method.backbone_text_features(chunk).float().cpu()
            for chunk in progress(chunks, len(chunks), "caching text features")
        ]
    )
