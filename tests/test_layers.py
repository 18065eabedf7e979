"""The layers import only downward (docs/design.md): frontends -> op -> impl ->
core, kernels -> core alone; the route table in the code is the one in the docs."""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each layer and the package layers it may import (itself included).
ALLOWED = {
    "core": {"core"},
    "kernels": {"kernels", "core"},
    "impl": {"impl", "kernels", "core"},
    "op": {"op", "impl", "kernels", "core"},
    "frontends": {"frontends", "op", "impl", "core"},
}


def _modules():
    """(layer, path, module name) of every Python module of the package."""
    for layer in ALLOWED:
        folder = os.path.join(ROOT, "kernels" if layer == "kernels" else os.path.join("fused_sigxent", layer))
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                package = "fused_sigxent." + layer
                yield layer, os.path.join(folder, name), package + ("" if name == "__init__.py" else "." + name[:-3])


def _imported_layers(path: str, module: str) -> set[str]:
    """The package layers a module imports, at the top or inside functions."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    layers = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fused_sigxent" and len(parts) > 1 and parts[1] in ALLOWED:
                layers.add(parts[1])
    return layers


@pytest.mark.parametrize("layer,path,module", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_go_only_downward(layer, path, module):
    wrong = _imported_layers(path, module) - ALLOWED[layer]
    assert not wrong, f"{module} ({layer}) imports {sorted(wrong)}"


def test_the_route_table_in_the_docs_is_the_code_s():
    from fused_sigxent.op import routes

    design = open(os.path.join(ROOT, "docs", "design.md")).read()
    table = design.split("## The route table", 1)[1].split("\n\n###", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert documented == [r.name for r in routes.ROUTES]
    docstring = re.findall(r"^\| (\w+) +\|", routes.__doc__, re.M)
    assert [n for n in docstring if n != "route"] == [r.name for r in routes.ROUTES]
