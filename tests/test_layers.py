"""The package's layers, as docs/architecture.md draws them, held by its import graph: each module's imports of
`trl_ica` (at any depth in the file, lazy imports included) point only at its own layer or the layers below."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "trl_ica")
BASE = {"seams", "embedded", "data_io", "plots", "presets"}
#: what each part of the package may import (its own part always)
ALLOWED = {
    "base": BASE,
    "scoring": {"seams", "embedded", "presets"},
    "selection": {"scoring", "seams", "embedded"},
    "trainer": {"scoring", *BASE},
    "cli": {"scoring", "selection", "trainer", *BASE},
    "launch": {"cli"},
    "__init__": {"scoring", "selection", "trainer"},
}


def part(module: str) -> str:
    """`scoring` for trl_ica.scoring.engine, `base` for trl_ica.seams, `__init__` for trl_ica itself."""
    names = module.split(".")[1:]
    if not names:
        return "__init__"
    return "base" if names[0] in BASE else names[0]


def imports():
    """(importing module, imported trl_ica module) for every import in the package."""
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            module = dotted.removesuffix(".__init__")
            package = module if name == "__init__.py" else module.rsplit(".", 1)[0]
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")[: len(package.split(".")) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target == "trl_ica":  # `from .. import seams`: the names are modules
                        for alias in node.names:
                            yield module, f"trl_ica.{alias.name}"
                    elif target.startswith("trl_ica."):
                        yield module, target
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("trl_ica"):
                            yield module, alias.name


def violations(found) -> list[str]:
    wrong = []
    for importer, imported in found:
        own, other = part(importer), part(imported)
        if other == own or other == "__init__" and own == "__init__":
            continue
        allowed = ALLOWED[own] if own != "base" else {"base"}
        layer = imported.split(".")[1] if other == "base" and own != "base" else other
        if layer not in allowed:
            wrong.append(f"{importer} imports {imported}")
    return wrong


def test_imports_point_only_down_the_layers():
    found = list(imports())
    assert len(found) > 50 and any(a.startswith("trl_ica.scoring.") for a, _ in found)
    wrong = violations(found)
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(wrong)


def test_the_layer_check_sees_an_import_back_up(tmp_path, monkeypatch):
    """The check itself: a scoring module that imports the command line is reported."""
    folder = tmp_path / "trl_ica" / "scoring"
    folder.mkdir(parents=True)
    (tmp_path / "trl_ica" / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    (folder / "bad.py").write_text("def f():\n    from ..cli.assets import load_gsm8k\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", str(tmp_path / "trl_ica"))
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert violations(imports()) == ["trl_ica.scoring.bad imports trl_ica.cli.assets"]
