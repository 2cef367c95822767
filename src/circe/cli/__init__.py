"""The `circe` command line: the typer app, with each command from the module of its group.

The commands are thin: they turn flags into a call of a library function and print what it
returns. `circe.cli.common` holds what they share.
"""

import typer

from circe.cli import data, demo, index, pseudo_targets, serve, train
from circe.cli.bench import bench_app
from circe.cli.eval import evaluate_command  # (the module by name would hide builtin eval)

app = typer.Typer(
    help="circe: composed image retrieval (reference image + modification text).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# `circe --help` lists the commands in this order (and the `bench` group after them).
app.command()(data.synth)
app.command()(train.pretrain)
app.command("methods")(train.list_registered)
app.command("eval")(evaluate_command)
app.command("check-dataset")(data.check_dataset_command)
app.command("train")(train.train_command)
app.add_typer(bench_app, name="bench")
app.command()(data.caption)
app.command("show-query")(demo.show_query)
app.command()(demo.demo)
app.command("index")(index.index_command)
app.command("search")(index.search_command)
app.command("serve")(serve.serve_command)
app.command("pseudo-targets")(pseudo_targets.pseudo_targets_command)
