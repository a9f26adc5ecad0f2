"""The import graph of the project: no cycles, and every arrow pointing one way, function-level imports included.

params -> models/loading -> pipeline -> accel -> entry points (cli, serving, distill, shapes, benchmarks, app).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdxl_fast", "benchmarks")

# Layer of each module (by the longest matching prefix); a module may import only from its own layer or below.
LAYERS = {
    "sdxl_fast": 0, "sdxl_fast.params": 0, "sdxl_fast.files": 0,
    "sdxl_fast.models": 1, "sdxl_fast.loading": 1, "sdxl_fast.metadata": 1,
    "sdxl_fast.pipeline": 2,
    "sdxl_fast.accel": 3,
    "sdxl_fast.testing": 4, "sdxl_fast.serving": 4, "sdxl_fast.cli": 4, "sdxl_fast.__main__": 4,
    "sdxl_fast.distill": 5, "sdxl_fast.shapes": 6,
    "benchmarks": 7, "app": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "app.py"] + [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {_module_name(p): p for p in files}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import submodule` imports the submodule; `from module import name`, the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_project_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from sdxl_fast.accel import options\n")
    assert imports_of("sdxl_fast.pipeline.m", source, project_modules()) == {"sdxl_fast.accel.options"}


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_imports_point_down_the_layers(module):
    graph = import_graph()
    upward = [target for target in graph[module] if layer(target) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports {upward} from a higher layer"


def test_the_cli_checks_its_arguments_without_importing_torch():
    code = ("import sys, sdxl_fast.cli as cli\n"
            "try:\n    cli.main(['generate', '--steps', 'many', 'x'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    assert "argument --steps: invalid int value: 'many'" in out.stderr
