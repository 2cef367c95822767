"""Embedding a folder on a Ray cluster (`circe index PATH --ray ADDRESS`).

One process embeds a few hundred images a second on CPU and a few thousand on a GPU; fifty
million product photos need many. Here Ray Data spreads the files over a pool of actors,
each holding one copy of the method (on a GPU when the actor was given one), and streams
the vectors back to this process, which writes them to the same pending shards as a local
build (`circe.index.pending`) and commits the same index generation. So `circe search` and
`circe serve` cannot tell a Ray-built index from a local one, an interrupted Ray run
resumes (locally or on Ray) from the shards it left, and the engine (FAISS or pgvector) is
chosen and built as usual once every vector is back.

The workers read the images by their absolute paths, so the folder must be on storage that
every node mounts at the same path; and each actor loads the method from the same source
(`MethodSource`: the checkpoint or weights paths must be on shared storage too). An actor
checks that what it loaded is the method this process loaded (the identity's hashes) and
refuses to embed otherwise: vectors of two models in one space would be silently wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circe.index.files import Failure, ImageFile
from circe.index.identity import MethodIdentity, identity_of
from circe.index.pending import ShardWriter
from circe.index.reader import decode
from circe.methods.plan import takes_raw_inputs
from circe.progress import Progress, no_progress


class RayUnavailableError(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to embed.

    address: "local" starts a Ray instance on this machine for the run (and stops it after);
    "auto" joins the cluster this machine is part of (`ray start` was run here); anything
    else is a cluster address (`HOST:6379`, `ray://HOST:10001`). When this process already
    runs Ray (`ray.init` was called), that instance is used and `address` is not looked at.
    """

    address: str = "local"
    actors: int = 2  # method copies embedding at once
    gpus_per_actor: float = 0.0  # e.g. 1: one GPU each; 0.5: two actors share one
    cpus_per_actor: float = 1.0  # also the torch threads of an actor on CPU
    batch_size: int = 64  # images per encoder call in an actor

    def __post_init__(self) -> None:
        if self.actors < 1 or self.batch_size < 1:
            raise ValueError("--ray-actors and --batch-size must be at least 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ValueError("--ray-gpus must be >= 0 and --ray-cpus > 0")


class EmbeddingActor:
    """One copy of the method, embedding batches of image paths (a Ray Data actor)."""

    def __init__(self, identity: dict[str, Any], threads: int):
        expected = MethodIdentity.from_json(identity)
        torch.set_num_threads(max(1, threads))
        method = expected.source.load()
        if torch.cuda.is_available():  # Ray hides the GPUs an actor was not given
            method = method.to("cuda")
        loaded = identity_of(method, expected.source)
        if loaded.weights_sha256 != expected.weights_sha256 or loaded.differences(expected):
            raise RuntimeError(
                f"this Ray worker loaded {loaded.describe()} from {expected.source}, not the "
                f"{expected.describe()} that the driver loaded: the files differ between "
                "machines; put one copy on shared storage"
            )
        self.method = method.eval()
        self.dim = loaded.embed_dim
        self.raw = takes_raw_inputs(method)
        self.preprocess = None if self.raw else method.backbone.preprocess

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"position": [n], "path": [n]} -> {"position": [n], "vector": [n, D] (zeros
        where the image failed), "error": [n] ("" where it did not)}."""
        decoded = [decode(Path(path), self.preprocess) for path in batch["path"]]
        good = [i for i, (inputs, _) in enumerate(decoded) if inputs is not None]
        vectors = np.zeros((len(decoded), self.dim), dtype=np.float32)  # [n, D]
        if good:
            inputs = [decoded[i][0] for i in good]
            with torch.no_grad():
                if self.raw:
                    embedded = self.method.encode_target_images(inputs)
                else:
                    pixels = torch.stack(inputs).to(self.method.backbone.device)
                    embedded = self.method.encode_targets(pixels)
            vectors[good] = embedded.float().cpu().numpy()
        return {
            "position": batch["position"],
            "vector": vectors,
            "error": np.array([error or "" for _, error in decoded], dtype=object),
        }


def _ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayUnavailableError(
            "embedding on Ray needs Ray Data: pip install 'circe[ray]'"
        ) from None
    return ray


def _connect(ray, address: str) -> bool:
    """Start or join Ray for this run; True when this call started it (so it stops it)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayUnavailableError(f"cannot start or reach Ray at {address!r}: {error}") from None
    return True


def embed_with_ray(
    identity: MethodIdentity,
    root: Path,
    files: list[ImageFile],
    shards: ShardWriter,
    options: RayOptions,
    progress: Progress = no_progress,
) -> tuple[dict[str, np.ndarray], list[Failure]]:
    """Embed `files` (under `root`) with a pool of Ray actors; every vector goes to `shards`
    as it comes back -> (relative path -> vector, the files that did not decode)."""
    ray = _ray()
    started_here = _connect(ray, options.address)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts the images that came back
        folder = Path(root).resolve()
        items = [{"position": i, "path": str(folder / f.path)} for i, f in enumerate(files)]
        vectors: dict[str, np.ndarray] = {}
        failed: list[tuple[int, Failure]] = []
        if not items:
            return vectors, []
        embedded = ray.data.from_items(items).map_batches(
            EmbeddingActor,
            # The identity travels as its plain record: its source holds only paths and names.
            fn_constructor_kwargs={
                "identity": identity.to_json(),
                "threads": int(options.cpus_per_actor),
            },
            batch_size=options.batch_size,
            batch_format="numpy",
            concurrency=options.actors,
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor,
        )
        batches = embedded.iter_batches(batch_size=options.batch_size, batch_format="numpy")
        for batch in progress(batches, -(-len(items) // options.batch_size), "embedding (Ray)"):
            for position, vector, error in zip(
                batch["position"], batch["vector"], batch["error"], strict=True
            ):
                file = files[int(position)]
                if error:
                    failed.append((int(position), Failure(file.path, str(error))))
                else:
                    vectors[file.path] = vector
                    shards.add(file, vector)
        # Batches come back in the order the actors finish them; failures are listed in
        # file order, as a local build lists them.
        return vectors, [failure for _, failure in sorted(failed, key=lambda f: f[0])]
    finally:
        if started_here:
            ray.shutdown()
