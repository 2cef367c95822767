"""Data commands: `circe synth` (the synthetic benchmark), `circe check-dataset` and
`circe caption` (reference captions for DQU-CIR)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from circe.cli.common import DEFAULT_SYNTHETIC_ROOT, RootOption, console, fail
from circe.progress import track


def synth(
    out: Annotated[Path, typer.Option(help="Directory to write the benchmark to.")] = (
        DEFAULT_SYNTHETIC_ROOT
    ),
    seed: int = 0,
    train: Annotated[int, typer.Option(help="Training queries.")] = 3000,
    val: int = 400,
    test: int = 1000,
    test_unseen: int = 400,
    edits_per_reference: int = 3,
    max_objects: Annotated[
        int, typer.Option(help="Most objects in a scene (1 to 9: one per grid cell).")
    ] = 5,
    image_size: Annotated[int, typer.Option(help="Side of the rendered images in pixels.")] = 128,
) -> None:
    """Write the synthetic benchmark (PNG images + JSON annotations), deterministic from SEED.
    `val_phrasing` and `test_phrasing` hold val's and test's pairs worded anew with held-out
    phrasing families, `val_free` and `test_free` the same pairs worded by independent rules."""
    from circe.data.synthetic import (
        SPLITS,
        SynthConfig,
        load_synthetic,
        wording_stats,
        write_synthetic,
    )

    config = SynthConfig(
        seed=seed,
        train=train,
        val=val,
        test=test,
        test_unseen=test_unseen,
        edits_per_reference=edits_per_reference,
        max_objects=max_objects,
        image_size=image_size,
    )
    try:
        root = write_synthetic(out, config, track)
    except (FileExistsError, ValueError) as error:
        raise fail(str(error)) from None
    wordings = wording_stats(root)
    for split in SPLITS:
        loaded = load_synthetic(root, split)
        words = wordings[split]
        shared = ""
        if split != "train":
            shared = (
                f" ({words['wordings_in_train']} also in train), "
                f"{words['skeletons_in_train']} texts worded like a train text"
            )
        console.print(
            f"{split:>13}: {len(loaded.queries)} queries, {len(loaded.gallery)} images, "
            f"{words['texts']} distinct texts, {words['wordings']} wordings{shared}"
        )
    console.print(f"written to {root}")


def check_dataset_command(
    dataset: Annotated[str, typer.Option(help="fashioniq | cirr | circo | shoes | ... | folder")],
    root: RootOption,
    split: Annotated[
        str | None, typer.Option(help="Split (default: every split the data set has).")
    ] = None,
    protocol: Annotated[str | None, typer.Option(help="Protocol preset.")] = None,
) -> None:
    """Validate a data set's files: counts, and every problem found (not just the first)."""
    from circe.data.registry import check_dataset

    try:
        report = check_dataset(dataset, root, split, protocol)
    except ValueError as error:
        raise fail(str(error)) from None
    for part, (queries, images) in report.counts.items():
        console.print(f"{part}: {queries} queries, {images} gallery images")
    for problem in report.problems:
        console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)
    if report.problems:
        console.print(f"{len(report.problems)} problem(s) in {root}")
        raise typer.Exit(code=1)
    console.print(f"{dataset} at {root}: no problems found")


def caption(
    model: Annotated[Path, typer.Option(help="Local Hugging Face BLIP / BLIP-2 model directory.")],
    out: Annotated[Path, typer.Option(help="Captions JSON {image id: caption} (resumed).")],
    dataset: Annotated[str, typer.Option(help="Data set (synthetic).")] = "synthetic",
    root: RootOption = DEFAULT_SYNTHETIC_ROOT,
    split: Annotated[str, typer.Option(help="Whose gallery images to caption.")] = "test",
    batch_size: int = 16,
    max_new_tokens: int = 30,
) -> None:
    """Caption a split's images with a local captioning model into a JSON file (DQU-CIR's
    reference captions); rerunning it resumes and only captions what is missing."""
    from circe.data.captions import HFCaptioner, caption_gallery
    from circe.data.registry import load_split

    try:
        data = load_split(dataset, root, split)
        captioner = HFCaptioner(model, max_new_tokens=max_new_tokens)
        captions = caption_gallery(data.gallery, captioner, out, batch_size, track)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise fail(str(error)) from None
    console.print(f"{len(captions)} captions in {out}")
