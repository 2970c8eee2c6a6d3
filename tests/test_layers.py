"""The import rule of qconv's modules, checked on the source (no import runs).

Layers, lowest first; a module imports only from its own layer or lower ones, never upward:

0. core: errors, version, files, manifest, progress, environment, modeling, calibration
1. formats: ``qconv.formats`` and its modules (the methods), on the core only
2. library: sources and their readers, plan, writer, artifact, verify, evaluate, loader, pipeline,
   model_card, hub, release, and ``qconv.registry`` (which takes the core only)
3. surface: ``qconv.api`` and the package ``qconv`` itself
4. CLI: ``qconv.cli`` (and ``qconv.__main__``), importing only the surface

Module-level imports must form no cycle. An import of a qconv module inside a function is allowed
only where the imported module brings a heavy optional dependency (listed below with it), never
to dodge a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"converter": "qconv", "formats": "qconv.formats", "registry": "qconv.registry"}

CORE = {
    "qconv.errors",
    "qconv.version",
    "qconv.files",
    "qconv.manifest",
    "qconv.progress",
    "qconv.environment",
    "qconv.modeling",
    "qconv.calibration",
}
SURFACE = {"qconv", "qconv.api"}
# what the CLI may import: the surface, plus the errors it maps to exit codes and the table of
# methods whose options become click options (both part of what users import)
CLI_MAY_IMPORT = SURFACE | {"qconv.errors", "qconv.formats", "qconv.progress"}

# (importer, imported) -> why the import waits until the function runs
DEFERRED = {
    ("qconv", "qconv.api"): "torch and transformers: `import qconv` stays light, and qconv.cli sets "
    "their logging environment before they load",
    ("qconv.formats.aqlm_solver", "qconv.formats.aqlm_triton"): "triton: optional, CUDA only",
    ("qconv.formats.hqq_solver", "qconv.formats.hqq_triton"): "triton: optional, CUDA only",
}


def module_names() -> dict[str, Path]:
    names = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join((package, *parts))] = path
    return names


MODULES = module_names()


def layer(name: str) -> int:
    if name in CORE:
        return 0
    if name == "qconv.formats" or name.startswith("qconv.formats."):
        return 1
    if name in SURFACE:
        return 3
    if name in ("qconv.cli", "qconv.__main__") or name.startswith("qconv.cli."):
        return 4
    return 2


def resolve(name: str) -> str:
    """The qconv module an import names (``from qconv.x import y``: y if it is a module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(path: Path, module: str) -> tuple[set[str], set[str]]:
    """(module-level, inside-function) qconv modules that ``path`` imports. Imports under
    ``if TYPE_CHECKING:`` are for annotations only and do not run."""
    tree = ast.parse(path.read_text())
    top, deferred = set(), set()

    def visit(node, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            guarded = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and not type_only:
                names = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif child.level:  # relative: from the module's own package
                    base = module.rsplit(".", child.level)[0] if child.level else module
                    names = [f"{base}.{child.module}" if child.module else base]
                elif child.module and child.module.startswith("qconv"):
                    names = [f"{child.module}.{a.name}" for a in child.names]
                for name in names:
                    if name.startswith("qconv"):
                        target = resolve(name)
                        if target != module:
                            (deferred if in_function else top).add(target)
            visit(child, nested, guarded)

    visit(tree, False, False)
    return top, deferred


GRAPH = {module: imports(path, module) for module, path in MODULES.items()}


def test_every_module_has_a_layer_and_the_layers_exist():
    assert CORE <= set(MODULES), sorted(CORE - set(MODULES))
    assert "qconv.api" in MODULES


def test_no_import_runs_upward():
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, (top, deferred) in GRAPH.items()
        for target in top | deferred
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_registry_and_formats_stand_on_the_core_only():
    wrong = [
        f"{module} imports {target}"
        for module, (top, deferred) in GRAPH.items()
        for target in top | deferred
        if (
            module.startswith("qconv.registry")
            and layer(target) != 0
            and not target.startswith("qconv.registry")
        )
        or (layer(module) == 1 and layer(target) not in (0, 1))
    ]
    assert wrong == []


def test_the_cli_imports_only_the_library_surface():
    wrong = [
        f"{module} imports {target}"
        for module, (top, deferred) in GRAPH.items()
        if layer(module) == 4
        for target in top | deferred
        if layer(target) != 4 and target not in CLI_MAY_IMPORT
    ]
    assert wrong == []


def test_module_level_imports_form_no_cycle():
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module][0]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                walk(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_imports_inside_functions_only_for_heavy_optional_dependencies():
    found = {(module, target) for module, (_, deferred) in GRAPH.items() for target in deferred}
    assert sorted(found - set(DEFERRED)) == []
    assert sorted(set(DEFERRED) - found) == [], "an entry of DEFERRED no longer applies"


def test_the_rule_catches_an_upward_import(tmp_path):
    """The walker itself: an upward import and a deferred one are seen."""
    path = tmp_path / "m.py"
    path.write_text("from qconv.pipeline import convert\n\ndef f():\n    from qconv import cli\n")
    top, deferred = imports(path, "qconv.files")
    assert top == {"qconv.pipeline"} and deferred == {"qconv.cli"}
    assert layer("qconv.pipeline") > layer("qconv.files")
