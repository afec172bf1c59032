"""halluc/ is layered (halluc/__init__.py): a module imports only its own package and those below it,
lazy imports inside functions included, so the folder shows the architecture and no cycle hides."""
import ast
from pathlib import Path

import halluc

ROOT = Path(halluc.__file__).parent
ORDER = ["core", "tasks", "structure", "training", "objectives", "inference", "sources", "pipeline"]


def halluc_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every halluc import in `source`, wherever it is (top level or in a function)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "halluc" else [f"halluc.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith("halluc.")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("halluc.")]
    return found


def upward_imports(package: str, source: str) -> list[str]:
    """Imports of `source` (a module of halluc.<package>) that reach a package above its own."""
    return [f"line {line}: {module}" for line, module in halluc_imports(source)
            if ORDER.index(module.split(".")[1]) > ORDER.index(package)]


def test_every_module_imports_only_downward():
    modules = [p for p in ROOT.rglob("*.py") if p.parent != ROOT]
    assert {p.relative_to(ROOT).parts[0] for p in modules} == set(ORDER)  # every package has a place
    assert len(modules) > 40
    bad = {str(p.relative_to(ROOT)): up for p in modules
           if (up := upward_imports(p.relative_to(ROOT).parts[0], p.read_text()))}
    assert not bad, bad


def test_nothing_in_halluc_loads_a_recipe_or_a_tool():
    """Recipes and tools sit on top: the library never imports them, by name or by path."""
    for p in ROOT.rglob("*.py"):
        tree = ast.parse(p.read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        called = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not any(m.split(".")[0] in ("recipes", "tools") for m in imported), p
        assert not called & {"spec_from_file_location", "run_path", "import_module"} or p.name == "__init__.py", p


def test_an_upward_import_is_caught():
    """Negative control: a lazy import of a higher layer, inside a function, is found."""
    source = "import torch\n\ndef f():\n    from halluc.pipeline.stages import train_stage\n    import halluc.core.config\n"
    assert upward_imports("training", source) == ["line 4: halluc.pipeline.stages"]
    assert upward_imports("pipeline", source) == []
    assert upward_imports("core", "from halluc import inference\n") == ["line 1: halluc.inference"]
