"""What the commands share: the console, user errors, loading a method, the default synthetic
benchmark, a training config from a YAML file and flags, and the options several commands take.

Heavy modules (torch, the trainer) are imported inside the functions, so that `circe --help`
stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from circe.progress import track

if TYPE_CHECKING:
    from circe.methods import CIRMethod
    from circe.train import TrainConfig

console = Console()

DEFAULT_SYNTHETIC_ROOT = Path("data/synthetic")

BackboneOption = Annotated[
    str,
    typer.Option(help="default | circe-tiny | open_clip:ARCH (with --weights FILE) | hf:MODEL_DIR"),
]
# For commands that read a training config: None keeps the config's backbone.
ConfigBackboneOption = Annotated[
    str | None,
    typer.Option(
        help="default | circe-tiny | open_clip:ARCH (with --weights FILE) | hf:MODEL_DIR "
        "(default: the config's, else default)"
    ),
]
WeightsOption = Annotated[
    Path | None, typer.Option(help="Local weights file for an open_clip backbone.")
]
RootOption = Annotated[Path, typer.Option(help="Data set directory.")]
# None: the training config's own value (its YAML file's, or the default).
ThreadsOption = Annotated[int | None, typer.Option(help="Torch CPU threads (0: default).")]
# Reading an index (`circe search`, `circe serve`).
IndexOption = Annotated[Path, typer.Option(help="Index directory made by `circe index`.")]
SpaceOption = Annotated[str | None, typer.Option(help="Embedding space (if several).")]
PgvectorOption = Annotated[
    str | None,
    typer.Option(
        help="PostgreSQL connection string, for a space indexed with --pgvector.",
        envvar="CIRCE_PGVECTOR_DSN",  # a DSN may hold a password: keep it off the command line
    ),
]


def fail(message: str) -> typer.Exit:
    """A mistake the user can fix: print `message` and exit with code 2 (`raise fail(...)
    from None`). Printed as given (no markup) and on one line however long, so that a path in
    it can be copied whole."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code=2)


def load_method(name: str, backbone: str, weights: Path | None) -> CIRMethod:
    """The registered method `name` on a fresh backbone."""
    from circe.backbones import WeightsNotFoundError, load_backbone
    from circe.methods import create_method

    try:
        return create_method(name, load_backbone(backbone, weights))
    except (WeightsNotFoundError, ValueError) as error:
        raise fail(str(error)) from None


def load_trained(path: Path) -> CIRMethod:
    """The trained method of a checkpoint (RUN_DIR/best or /last of `circe train`)."""
    from circe.methods.checkpoint import load_trained_method

    try:
        return load_trained_method(path)
    except (FileNotFoundError, ValueError) as error:  # WeightsNotFoundError included
        raise fail(str(error)) from None


def ensure_synthetic(dataset: str, root: Path) -> None:
    """Generate the default synthetic benchmark when it is asked for and absent, so that the
    commands work on a fresh checkout."""
    from circe.data.synthetic import SynthConfig, write_synthetic

    if (
        dataset == "synthetic"
        and root == DEFAULT_SYNTHETIC_ROOT
        and not (root / "meta.json").exists()
    ):
        console.print(f"no benchmark at {root}: generating the default one (circe synth)")
        write_synthetic(root, SynthConfig(), track)


def metrics_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    """One row per name, one column per metric (the first row's), two decimals."""
    table = Table(title=title)
    columns = list(next(iter(rows.values())))
    table.add_column("")
    for column in columns:
        table.add_column(column, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{values[c]:.2f}" for c in columns))
    return table


# The flags that set a TrainConfig field under another name; every other training flag is
# named after its field (and an unknown name is TrainConfig.replace's error).
_FIELD_OF_FLAG = {"weights": "backbone_weights"}


def train_overrides(**flags: Any) -> dict[str, Any]:
    """The TrainConfig fields that training flags set: those given (None: not given), under
    their field names, paths as the config's strings."""
    return {
        _FIELD_OF_FLAG.get(flag, flag): str(value) if isinstance(value, Path) else value
        for flag, value in flags.items()
        if value is not None
    }


def train_settings(config: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The YAML `config` (or the defaults) with `overrides` (`train_overrides`); generates the
    default synthetic benchmark when the settings train on it and it is absent."""
    from circe.train import TrainConfig

    settings = TrainConfig.from_yaml(config) if config else TrainConfig()
    settings = settings.replace(**overrides)
    ensure_synthetic(settings.dataset, Path(settings.root))
    return settings
