"""The package's layout: one folder per part, no import cycle among its modules, and every import
pointing down the layers (imports inside functions included), so each part can be read, and
loaded, on its own."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fastattn"
PARTS = {"backends", "triton", "gluon", "nn", "integrations", "models", "bench", "distributed"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source(module: str) -> str:
    """A module's file, relative to the repository."""
    path = ROOT.parent.joinpath(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT.parent))


def imports() -> dict[str, dict[str, int]]:
    """module -> {each fastattn module it imports: the line of its first such import}. `from pkg
    import name` counts as pkg.name when that is a module, else as pkg; the compiled fastattn._C
    is a leaf; imports inside functions count."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(paths) | {"fastattn._C"}
    found = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{target}.{a.name}" for a in node.names} & known
                targets = subs | ({target} if len(subs) < len(node.names) and target in known else set())
            else:
                continue
            for dep in targets - {name}:
                deps[dep] = min(deps.get(dep, node.lineno), node.lineno)
        found[name] = deps
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the fastattn modules it imports (as `imports`)."""
    return {name: set(deps) for name, deps in imports().items()}


# The layers, lowest first: a module imports from its own layer and those below, never from one
# above. "pkg.*" is a package and everything in it; any other name is that module alone.
LAYERS = [
    ("declaration", {"fastattn.call"}),  # Call: what every layer takes, so below them all
    ("kernels", {"fastattn._C", "fastattn.reference", "fastattn.masks", "fastattn.triton.*", "fastattn.gluon.*"}),
    ("backends", {"fastattn.backends.*"}),
    ("op", {"fastattn.ops"}),
    # front_door: validates a call and builds its Call and Problem
    ("front door", {"fastattn.api", "fastattn.front_door"}),
    ("features", {"fastattn.varlen", "fastattn.kvcache", "fastattn.merge", "fastattn.distributed.*"}),
    ("modules", {"fastattn.nn.*"}),
    ("tools", {"fastattn.integrations.*", "fastattn.models.*", "fastattn.bench.*"}),
    ("faces", {"fastattn", "fastattn.__main__"}),  # the namespace and the CLI: import anything, imported by none
]


def layer(module: str) -> int | None:
    """The index in LAYERS of a module's layer; None where no layer names it."""
    for i, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".*") and (module == member[:-2] or module.startswith(member[:-1]))):
                return i
    return None


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if layer(m) is None)
    assert not unplaced, f"modules that no layer in LAYERS names (place them): {', '.join(unplaced)}"


def test_imports_point_down_the_layers():
    """kernels < backends < op < front door < features < modules < tools (integrations, models,
    bench) < faces: an import from a higher layer, even inside a function, is a violation."""
    wrong = []
    for module, deps in sorted(imports().items()):
        for dep, line in sorted(deps.items()):
            if layer(module) is not None and layer(dep) is not None and layer(dep) > layer(module):
                wrong.append(f"{source(module)}:{line} imports {dep}: {module} is in layer "
                             f"{LAYERS[layer(module)][0]!r}, {dep} in the higher layer {LAYERS[layer(dep)][0]!r}")
    assert not wrong, "imports against the layers' direction (" + " < ".join(n for n, _ in LAYERS) + "):\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph, state = import_graph(), {}

    def visit(module, path):  # depth first: a module met again on the current path closes a cycle
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [module, dep])}"
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_one_folder_per_part():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == PARTS
    top_level = {p.stem for p in ROOT.glob("*.py")}
    assert top_level == {"__init__", "__main__", "api", "call", "front_door", "varlen", "kvcache", "masks", "merge",
                         "ops", "reference"}
