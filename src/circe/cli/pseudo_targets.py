"""`circe pseudo-targets`: TMCIR's pseudo-target images for a split's queries
(`circe.pseudo_targets`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from circe.cli.common import DEFAULT_SYNTHETIC_ROOT, RootOption, console, ensure_synthetic, fail
from circe.progress import track


def pseudo_targets_command(
    dataset: Annotated[str, typer.Option(help="Data set (e.g. synthetic, fashioniq, cirr).")],
    generator: Annotated[
        str, typer.Option(help="scene-editor (synthetic only) | diffusers | directory")
    ],
    out: Annotated[Path, typer.Option(help="Directory for the images and the manifest.")],
    root: RootOption = DEFAULT_SYNTHETIC_ROOT,
    split: Annotated[str, typer.Option(help="Split whose queries get pseudo-targets.")] = "train",
    protocol: Annotated[
        str | None, typer.Option(help="The data set's protocol preset (default: its own).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Only the first N queries (a later run goes on).")
    ] = None,
    noise: Annotated[
        float | None, typer.Option(help="scene-editor: rate of mistaken edits (default 0.3).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="scene-editor, diffusers: seed.")] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="diffusers: pipeline directory (save_pretrained).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="diffusers: denoising steps.")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="diffusers: text guidance.")] = None,
    image_guidance_scale: Annotated[
        float | None, typer.Option(help="diffusers: image guidance (InstructPix2Pix).")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="diffusers: square input size for the model.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="diffusers: images per call.")] = None,
    device: Annotated[str | None, typer.Option(help="diffusers: auto | cpu | cuda.")] = None,
    source: Annotated[
        Path | None, typer.Option(help="directory: images named <query id>.png.")
    ] = None,
    threads: Annotated[int, typer.Option(help="Torch CPU threads (0: default).")] = 0,
) -> None:
    """Make a pseudo-target image for every query of a split (resumable: run it again to
    finish an interrupted run); writes DIR/images, DIR/manifest.jsonl, DIR/pseudo-targets.json."""
    from circe.data.registry import load_split
    from circe.pseudo_targets.generate import create_generator, generate_pseudo_targets
    from circe.threads import set_torch_threads

    set_torch_threads(threads)
    options = {
        "noise": noise,
        "seed": seed,
        "model_dir": model_dir,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "image_guidance_scale": image_guidance_scale,
        "resolution": resolution,
        "batch_size": batch_size,
        "device": device,
        "source": source,
    }
    try:
        ensure_synthetic(dataset, root)
        data = load_split(dataset, root, split, protocol)
        editor = create_generator(generator, dataset, root, **options)
        report = generate_pseudo_targets(data, editor, out, dataset, limit, track)
    except (OSError, ImportError, ValueError) as error:
        raise fail(str(error)) from None
    console.print(
        f"{report.made} pseudo-targets made, {report.kept} already there, of {report.queries} "
        f"queries; manifest: {out / 'manifest.jsonl'}"
    )
