"""The package's layers (docs/design.md#layout-and-layers): every import in af2_jax/, function-local ones too, goes
to the importing module's own layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "af2_jax"

# Module (or package prefix) -> layer, bottom to top; the longest matching prefix decides.
LAYERS = {
    "af2_jax.config": 0, "af2_jax.audio": 0, "af2_jax.sharding": 0, "af2_jax.distributed": 0,
    "af2_jax.tokenizer": 0, "af2_jax.cache": 0,
    "af2_jax.nn": 1,
    "af2_jax.checkpoint": 2,
    "af2_jax.engine": 3, "af2_jax.generate": 3, "af2_jax.pipeline": 3, "af2_jax.manifest": 3, "af2_jax.planning": 3,
    "af2_jax.training": 3, "af2_jax.metrics": 3,
    "af2_jax": 4,  # the package root: the public API, built on every library layer
    "af2_jax.server": 4, "af2_jax.evaluation": 4,
    "af2_jax.cli": 5,
    # `python -m af2_jax.X` shims over af2_jax.cli.X
    "af2_jax.infer": 5, "af2_jax.convert": 5, "af2_jax.train": 5, "af2_jax.plan": 5, "af2_jax.serve": 5,
    "af2_jax.eval": 5,
    "af2_jax.audio.__main__": 5,
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").is_file() or (PACKAGE.parent / relative).is_dir()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of an af2_jax module in a file, wherever it sits: `from X import name`
    imports X.name when that is a module, else X."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
                      for alias in node.names]
    return [(line, name) for line, name in found if name == "af2_jax" or name.startswith("af2_jax.")]


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        own = layer_of(importer)
        if own is None:
            problems.append(f"{importer}: in no layer; add it to LAYERS and docs/design.md#layout-and-layers")
            continue
        for line, imported in imported_modules(path):
            layer = layer_of(imported)
            if layer is not None and layer > own:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {importer} (layer {own}) imports "
                                f"{imported} (layer {layer})")
    return problems


def test_every_import_goes_to_the_same_layer_or_below():
    assert upward_imports() == []


def test_the_check_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    """A planted upward import, inside a function and written relatively, is found."""
    package = tmp_path / "af2_jax"
    (package / "nn").mkdir(parents=True)
    (package / "checkpoint").mkdir()
    (package / "__init__.py").write_text("")
    (package / "nn" / "__init__.py").write_text("")
    (package / "checkpoint" / "__init__.py").write_text("")
    (package / "checkpoint" / "native.py").write_text("")
    (package / "nn" / "model.py").write_text("def f():\n    from ..checkpoint import native\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", package)
    assert upward_imports() == ["af2_jax/nn/model.py:2: af2_jax.nn.model (layer 1) imports "
                                "af2_jax.checkpoint.native (layer 2)"]
