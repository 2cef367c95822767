"""Frozen-backbone feature cache: compute each image's and text's features once, keep them.

Layout: `<cache_dir>/<key>/features.safetensors` (`features`: `[N, D]` float32, row i for
item i) + `meta.json` (what the key was made of, for people and for checking). The key is
the sha256 of: the backbone identity (`short()` and the full weights sha256), a fingerprint
of how inputs become tensors (preprocessing, tokenizer, context length), what is cached (pooled image or text embeddings, or token
sequences), and the items themselves (image ids + file path, size and mtime; or the texts),
so any change to any of them is a miss rather than a stale hit. Entries are written to a
temporary directory and renamed into place, so a reader never sees a half-written entry.

Token entries (methods that fuse token sequences, `MethodInputs(query="tokens")`) are much
larger (a ViT-B/16 image is 197 x 768 numbers instead of 512), so they are kept as plain `.npy` files that are
memory-mapped rather than loaded: `tokens.npy` `[N, L, W]` float16 (written batch by batch,
and cut after the last position any item uses: text padding is not stored), `mask.npy`
`[N, L]` bool and `pooled.npy` `[N, D]` float32. A batch reads only its own rows from disk
and turns them into float32 (`TokenStore`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from safetensors.torch import load_file, save_file

from circe.atomic import fsync_path
from circe.backbones.base import Backbone
from circe.data.batching import image_batches
from circe.data.types import Gallery
from circe.methods.base import FrozenBackboneMethod
from circe.methods.inputs import TokenFeatures
from circe.progress import Progress

FORMAT_VERSION = 1


def _sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def image_items(gallery: Gallery, ids: Sequence[str]) -> list[list]:
    """(id, path, size, mtime_ns) per image: a changed file changes the key."""
    items = []
    for image_id in ids:
        path = gallery.paths[image_id]
        stat = path.stat()
        items.append([image_id, str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return items


class TokenStore:
    """A token cache entry: the token sequences stay memory-mapped float16 on disk, and
    indexing with a tensor of rows reads just those rows, as float32 `TokenFeatures`."""

    def __init__(self, pooled: torch.Tensor, tokens: np.ndarray, mask: torch.Tensor):
        self.pooled = pooled  # [N, D] float32
        self.tokens = tokens  # [N, L, W] float16, a read-only np.memmap
        self.mask = mask  # [N, L] bool

    @classmethod
    def open(cls, entry: Path) -> TokenStore:
        return cls(
            torch.from_numpy(np.load(entry / "pooled.npy")),
            np.load(entry / "tokens.npy", mmap_mode="r"),
            torch.from_numpy(np.load(entry / "mask.npy")),
        )

    def __len__(self) -> int:
        return len(self.pooled)

    def __getitem__(self, rows: torch.Tensor) -> TokenFeatures:
        tokens = torch.from_numpy(self.tokens[rows.numpy()]).float()  # [b, L, W], a copy
        return TokenFeatures(self.pooled[rows], tokens, self.mask[rows])


# Rows copied at a time when a token file is cut to its used length (bounds the memory).
_COPY_ROWS = 1024


def _write_tokens(folder: Path, batches: Iterable[TokenFeatures], count: int) -> None:
    """Stream `count` rows of `TokenFeatures` batches into the three files of a token entry."""
    path = folder / "tokens.npy"
    tokens = mask = pooled = None
    row = 0
    for batch in batches:
        if tokens is None:
            shape = batch.tokens.shape[1:]  # (L, W)
            tokens = open_memmap(path, mode="w+", dtype=np.float16, shape=(count, *shape))
            mask = np.zeros((count, shape[0]), dtype=bool)
            pooled = np.zeros((count, batch.pooled.shape[1]), dtype=np.float32)
        half = batch.tokens.to(torch.float16)
        if not torch.isfinite(half).all():
            raise ValueError("token features overflow float16; this backbone cannot be cached")
        end = row + len(batch)
        tokens[row:end] = half.numpy()
        mask[row:end] = batch.mask.numpy()
        pooled[row:end] = batch.pooled.float().numpy()
        row = end
    if tokens is None or row != count:
        raise ValueError(f"expected token features of {count} items, got {row}")
    tokens.flush()
    length = int(np.flatnonzero(mask.any(axis=0)).max()) + 1  # positions past it: padding
    if length < tokens.shape[1]:
        # Padding in every row (texts: 15 of CLIP's 48 positions on the synthetic benchmark):
        # keep the used positions only, copied a block of rows at a time.
        cut_path = folder / "tokens-cut.npy"
        cut = open_memmap(
            cut_path, mode="w+", dtype=np.float16, shape=(count, length, tokens.shape[2])
        )
        for start in range(0, count, _COPY_ROWS):
            cut[start : start + _COPY_ROWS] = tokens[start : start + _COPY_ROWS, :length]
        cut.flush()
        del tokens, cut  # unmap both before the cut file replaces the full one
        os.replace(cut_path, path)
    np.save(folder / "mask.npy", mask[:, :length])
    np.save(folder / "pooled.npy", pooled)


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, backbone: Backbone, what: str, items: list) -> tuple[str, dict]:
        fields = {
            "format": FORMAT_VERSION,
            "backbone": backbone.identity.short(),
            "weights_sha256": backbone.identity.weights_sha256,
            # preprocessing, tokenizer and context length (`Backbone.inputs_sha256`)
            "inputs_sha256": backbone.identity.inputs_sha256,
            "what": what,
            "items_sha256": _sha256(items),
            "count": len(items),
        }
        return _sha256(fields), fields

    def path(self, key: str) -> Path:
        return self.root / key

    def _complete(self, key: str) -> dict | None:
        """The meta.json of a complete entry, or None."""
        meta = self.path(key) / "meta.json"
        return json.loads(meta.read_text()) if meta.is_file() else None

    def load(self, key: str) -> torch.Tensor | None:
        """The cached `[N, D]` features, or None when there is no complete entry."""
        meta = self._complete(key)
        if meta is None:
            return None
        features = load_file(str(self.path(key) / "features.safetensors"))["features"]
        self._check(key, meta, len(features))
        return features

    def load_tokens(self, key: str) -> TokenStore | None:
        """The cached token sequences, memory-mapped, or None when there is no complete entry."""
        meta = self._complete(key)
        if meta is None:
            return None
        store = TokenStore.open(self.path(key))
        self._check(key, meta, len(store))
        return store

    def _check(self, key: str, meta: dict, rows: int) -> None:
        if rows != meta["count"]:
            raise ValueError(
                f"feature cache entry {self.path(key)} is corrupt; delete that directory"
            )

    def store(self, key: str, fields: dict, features: torch.Tensor) -> None:
        """Write an entry of `[N, D]` features atomically."""
        with self._staged(key, fields) as staging:
            save_file({"features": features.contiguous()}, str(staging / "features.safetensors"))

    def store_tokens(self, key: str, fields: dict, batches: Iterable[TokenFeatures]) -> None:
        """Write a token entry atomically, batch by batch as `batches` computes them (the
        sequences are never all in memory at once)."""
        with self._staged(key, fields) as staging:
            _write_tokens(staging, batches, fields["count"])

    def size(self, key: str) -> int:
        """Bytes on disk of a stored entry."""
        return sum(file.stat().st_size for file in self.path(key).iterdir())

    @contextmanager
    def _staged(self, key: str, fields: dict) -> Iterator[Path]:
        """A temporary directory to write an entry's files into; on success its files and
        meta.json are fsynced and it is renamed into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
            (staging / "meta.json").write_text(json.dumps(fields, indent=2))
            for file in staging.iterdir():
                fsync_path(file)
            try:
                os.rename(staging, self.path(key))
            except OSError:
                if self._complete(key) is None:
                    raise
                # Another process stored the same entry first: same key, same content.
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@torch.no_grad()
def _image_outputs(
    encode: Callable,
    method: FrozenBackboneMethod,
    gallery: Gallery,
    ids: Sequence[str],
    batch_size: int,
    workers: int,
    progress: Progress,
    description: str,
) -> Iterator:
    """`encode` of the images `ids`, batch by batch in order, on the CPU."""
    device = method.backbone.device
    batches = image_batches(gallery, ids, method.backbone.preprocess, batch_size, workers)
    total = -(-len(ids) // batch_size)
    for pixels in progress(batches, total, description):
        yield encode(pixels.to(device)).to("cpu")


def compute_image_features(
    method: FrozenBackboneMethod,
    gallery: Gallery,
    ids: Sequence[str],
    batch_size: int,
    workers: int,
    progress: Progress,
) -> torch.Tensor:
    """`[N, D]` backbone image features of `ids`, in order (float32, on the CPU)."""
    outputs = _image_outputs(
        method.backbone_image_features,
        method,
        gallery,
        ids,
        batch_size,
        workers,
        progress,
        "caching image features",
    )
    return torch.cat([features.float() for features in outputs])


def image_token_batches(
    method: FrozenBackboneMethod,
    gallery: Gallery,
    ids: Sequence[str],
    batch_size: int,
    workers: int,
    progress: Progress,
) -> Iterator[TokenFeatures]:
    """The image tower's `TokenFeatures` of `ids`, batch by batch (for `store_tokens`)."""
    return _image_outputs(
        method.backbone_image_tokens,
        method,
        gallery,
        ids,
        batch_size,
        workers,
        progress,
        "caching image tokens",
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
def _text_outputs(
    encode: Callable, texts: Sequence[str], batch_size: int, progress: Progress, description: str
) -> Iterator:
    """`encode` of `texts`, batch by batch in order, on the CPU."""
    chunks = [list(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    for chunk in progress(chunks, len(chunks), description):
        yield encode(chunk).to("cpu")


def compute_text_features(
    method: FrozenBackboneMethod, texts: Sequence[str], batch_size: int, progress: Progress
) -> torch.Tensor:
    """`[T, D]` backbone text features of `texts`, in order (float32, on the CPU)."""
    outputs = _text_outputs(
        method.backbone_text_features, texts, batch_size, progress, "caching text features"
    )
    return torch.cat([features.float() for features in outputs])


def text_token_batches(
    method: FrozenBackboneMethod, texts: Sequence[str], batch_size: int, progress: Progress
) -> Iterator[TokenFeatures]:
    """The text tower's `TokenFeatures` of `texts`, batch by batch (for `store_tokens`)."""
    return _text_outputs(
        method.backbone_text_tokens, texts, batch_size, progress, "caching text tokens"
    )
