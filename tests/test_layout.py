"""The package's layout: one folder per part, and no import cycle among its modules (imports inside
functions included), so each part can be read, and loaded, on its own."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fastattn"
PARTS = {"backends", "triton", "gluon", "nn", "integrations", "models", "bench", "distributed"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the fastattn modules it imports (`from pkg import name` counts as pkg.name when
    that is a module, else as pkg; the compiled fastattn._C is a leaf)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(paths) | {"fastattn._C"}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{target}.{a.name}" for a in node.names} & known
                deps |= subs | ({target} if len(subs) < len(node.names) and target in known else set())
        graph[name] = deps - {name}
    return graph


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
    front_door = {p.stem for p in ROOT.glob("*.py")}
    assert front_door == {"__init__", "__main__", "api", "varlen", "kvcache", "masks", "merge", "ops", "reference"}
