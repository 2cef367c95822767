"""Captions of reference images (DQU-CIR's unified textual query starts with one).

DQU-CIR captions every image offline with BLIP-2 and ships the captions as JSON files
{image id: caption}; circe uses the same form everywhere:

- `CaptionFile`: such a file (the published captions of FashionIQ / CIRR / Shoes, or one
  written by `circe caption`).
- the data set's own captions (`Gallery.captions`; the synthetic benchmark has one per image),
  which a method receives with the raw query and uses when no file is given.
- `HFCaptioner`: a local Hugging Face image-captioning model (BLIP, BLIP-2) directory, used by
  `caption_gallery` (`circe caption`) to write a caption file, with a progress bar, resuming
  where an interrupted run stopped. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from circe.atomic import write_text_atomic
from circe.data.types import DatasetFormatError, Gallery
from circe.progress import Progress


def read_captions(path: str | Path) -> dict[str, str]:
    """A captions JSON file {image id: caption}; names the file and entry when malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"captions file not found: {path}; write one with `circe caption --model DIR`"
        )
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(records, dict):
        raise DatasetFormatError(f"{path} must hold a JSON object {{image id: caption}}")
    for image_id, caption in records.items():
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetFormatError(f"{path}: the caption of {image_id!r} is empty or not text")
    return records


def _write_atomically(path: Path, captions: dict[str, str]) -> None:
    write_text_atomic(path, json.dumps(captions, indent=1, ensure_ascii=False))


class CaptionFile:
    """Captions looked up by image id from a JSON file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.captions = read_captions(self.path)

    def caption(self, image_id: str | None) -> str:
        try:
            return self.captions[image_id]
        except KeyError:
            raise KeyError(
                f"{self.path} has no caption for image {image_id!r}; caption it with "
                "`circe caption` (which resumes and adds the missing ones)"
            ) from None


class HFCaptioner:
    """A local Hugging Face captioning model (`BlipForConditionalGeneration`, `Blip2...`,
    any image-to-text auto model) with its processor, greedy decoding, no prompt."""

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 30, device: str = "cpu"):
        import transformers

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.model_dir} is not a Hugging Face model directory (no config.json); "
                "save one with model.save_pretrained(DIR) and processor.save_pretrained(DIR)"
            )
        self.processor = transformers.AutoProcessor.from_pretrained(
            self.model_dir, local_files_only=True
        )
        # transformers 5 names the auto class of captioners ImageTextToText; 4.x had
        # Vision2Seq (ImageTextToText appeared in 4.45 and maps BLIP in 5 only).
        auto = getattr(transformers, "AutoModelForVision2Seq", None)
        if auto is None:
            auto = transformers.AutoModelForImageTextToText
        self.model = auto.from_pretrained(self.model_dir, local_files_only=True).to(device)
        self.model.eval()
        self.max_new_tokens, self.device = max_new_tokens, device

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        # An untrained or degenerate model may say nothing: keep the file valid and say so.
        return [" ".join(t.split()) or "an image" for t in texts]


def caption_gallery(
    gallery: Gallery,
    captioner: Callable[[list[Image.Image]], list[str]],
    out: str | Path,
    batch_size: int = 16,
    progress: Progress | None = None,
    save_every: int = 10,
) -> dict[str, str]:
    """Caption every gallery image into the JSON file `out`. Images already in `out` are
    kept (so an interrupted run resumes); the file is rewritten atomically every
    `save_every` batches and at the end."""
    out = Path(out)
    captions = read_captions(out) if out.exists() else {}
    todo = [i for i in gallery.ids if i not in captions]
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    items: Iterable = chunks
    if progress is not None:
        items = progress(chunks, len(chunks), f"captioning {len(todo)} images")
    out.parent.mkdir(parents=True, exist_ok=True)
    for n, chunk in enumerate(items, 1):
        texts = captioner([gallery.open(i) for i in chunk])
        captions.update(zip(chunk, texts, strict=True))
        if n % save_every == 0:
            _write_atomically(out, captions)
    _write_atomically(out, captions)
    return captions
