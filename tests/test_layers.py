"""circe's import rule, checked on the source: a layer imports only the
layers below it, and packages side by side in one layer do not import each other."""

import ast
from pathlib import Path

import circe

# Lowest first. A module belongs to the longest entry that prefixes its name; "circe" is the
# top package's own module only (its version), not everything under it.
LAYERS = [
    ("utilities", ["circe", "circe.progress", "circe.atomic", "circe.threads"]),
    ("encoders and data", ["circe.backbones", "circe.data"]),
    ("derived data", ["circe.pseudo_targets"]),
    ("methods", ["circe.methods"]),
    ("evaluation and index", ["circe.eval", "circe.index"]),
    ("training", ["circe.train", "circe.pretrain"]),
    ("faces and experiments", ["circe.serve", "circe.bench", "circe.demo"]),
    ("command line", ["circe.cli"]),
]
SOURCE = Path(circe.__file__).parent


def unit(module: str) -> tuple[int, str]:
    """(layer number, package or module of that layer) of a dotted module name."""
    matches = [
        (len(prefix), number, prefix)
        for number, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or (prefix != "circe" and module.startswith(prefix + "."))
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS (and to DESIGN.md's map)"
    _, number, prefix = max(matches)
    return number, prefix


def imports(path: Path, module: str) -> set[str]:
    """Every circe module `path` imports, anywhere in it (functions and type-checking blocks
    too: a lazy import is still a dependency)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
    return {name for name in found if name == "circe" or name.startswith("circe.")}


def modules():
    for path in sorted(SOURCE.rglob("*.py")):
        parts = ("circe", *path.relative_to(SOURCE).with_suffix("").parts)
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_belongs_to_a_layer():
    for _, module in modules():
        unit(module)  # raises on a module no layer names


def test_imports_point_down_only():
    wrong = []
    for path, module in modules():
        layer, own = unit(module)
        for target in imports(path, module):
            target_layer, target_unit = unit(target)
            if target_unit == own or target_layer < layer:
                continue
            wrong.append(
                f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})"
            )
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The rule catches what it is for (so that an empty list above means something)."""
    source = tmp_path / "checkpoint.py"
    source.write_text("def load():\n    from circe.train.data import load_split\n")
    module = "circe.methods.checkpoint"
    assert imports(source, module) == {"circe.train.data"}
    assert unit(module)[0] < unit("circe.train.data")[0]
