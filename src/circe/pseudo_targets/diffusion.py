"""Pseudo-targets from a diffusers image-editing pipeline (InstructPix2Pix, or any pipeline
that takes a prompt and an image) saved in a local directory.

The pipeline is loaded from disk only (`local_files_only`): a directory written by
`pipeline.save_pretrained(DIR)` or downloaded beforehand. The reference image is resized to
`resolution` x `resolution` for the model, and its edit back to the reference's own size.
Each query draws its noise from its own generator, seeded from `seed` and the query id, so
an image does not depend on the batch it was made in, nor on where a run was resumed.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from circe.data.types import Gallery, Query
from circe.pseudo_targets.generate import Edited, PseudoTargetGenerator


def _query_seed(seed: int, query_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{query_id}".encode()).digest()[:8], "little")


class DiffusionEditor(PseudoTargetGenerator):
    """A diffusers editing pipeline from `model_dir`, one prompt (the modification text) and
    one image (the reference) per query."""

    name = "diffusers"
    options = (
        "model_dir",
        "steps",
        "guidance_scale",
        "image_guidance_scale",
        "resolution",
        "seed",
        "batch_size",
        "device",
    )

    def __init__(
        self,
        model_dir: Path,
        steps: int = 20,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        resolution: int = 512,
        seed: int = 0,
        batch_size: int = 4,
        device: str = "auto",
    ):
        import torch

        try:
            import diffusers
        except ImportError:
            raise ImportError(
                "the diffusers generator needs diffusers: pip install 'circe[edit]'"
            ) from None
        model_dir = Path(model_dir)
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(
                f"no diffusers pipeline at {model_dir} (expected model_index.json, as "
                "`pipeline.save_pretrained(DIR)` writes it); circe never downloads models"
            )
        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        if batch_size < 1 or steps < 1:
            raise ValueError("batch_size and steps must be at least 1")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # Half precision on a GPU (the models are trained in it); a CPU computes in float32.
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.pipeline = diffusers.DiffusionPipeline.from_pretrained(
            model_dir, local_files_only=True, dtype=dtype
        ).to(device)
        self.pipeline.set_progress_bar_config(disable=True)  # circe's own bar counts images
        self.model_dir, self.device, self.batch_size = model_dir.resolve(), device, batch_size
        self.resolution, self.seed = resolution, seed
        wanted = {
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "image_guidance_scale": image_guidance_scale,
        }
        # Pipelines differ in their settings (img2img has no image guidance): pass each the
        # ones it names.
        named = inspect.signature(self.pipeline.__call__).parameters
        self.call_settings = {k: v for k, v in wanted.items() if k in named}
        for needed in ("prompt", "image", "generator"):
            if needed not in named:
                raise ValueError(
                    f"{type(self.pipeline).__name__} at {model_dir} takes no {needed!r}: an "
                    "image-editing pipeline (e.g. StableDiffusionInstructPix2PixPipeline) "
                    "is needed"
                )

    @classmethod
    def create(
        cls, dataset: str, root: Path, model_dir: Path | None = None, **settings
    ) -> DiffusionEditor:
        if model_dir is None:
            raise ValueError(
                "the diffusers generator needs --model-dir DIR: a diffusers image-editing "
                "pipeline saved with save_pretrained (e.g. InstructPix2Pix)"
            )
        return cls(Path(model_dir), **settings)

    def settings(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "pipeline": type(self.pipeline).__name__,
            "resolution": self.resolution,
            "seed": self.seed,
            **self.call_settings,
        }

    def edit(self, queries: Sequence[Query], gallery: Gallery) -> list[Edited]:
        import torch

        references = [gallery.open(q.reference_id) for q in queries]
        square = (self.resolution, self.resolution)
        generators = [
            torch.Generator(self.device).manual_seed(_query_seed(self.seed, q.query_id))
            for q in queries
        ]
        output = self.pipeline(
            prompt=[q.text for q in queries],
            image=[image.resize(square, Image.BICUBIC) for image in references],
            generator=generators,
            output_type="pil",
            **self.call_settings,
        )
        return [
            Edited(edited.resize(reference.size, Image.BICUBIC))
            for edited, reference in zip(output.images, references, strict=True)
        ]
