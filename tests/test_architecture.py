"""The architecture DESIGN.md and the README promise, checked on the source: each folder imports only the folders
below it, no task imports another task, nothing imports the CLI, and the README's map names files that exist."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vitkit"

# Folder ranks: a module may import its own folder and any folder of a lower rank, never one of the same rank
# beside it or above it. errors/validate/runtime are the floor every folder may use.
RANK = {"errors": -1, "validate": -1, "runtime": -1, "models": 0, "data": 1, "io": 1, "train": 2, "tasks": 3,
        "serve": 4, "cli": 5, "__main__": 6}
# Modules of one task: classify's recipe and planner are parts of it. Every other task module stands alone.
TASK_PARTS = {"classify": {"plan", "recipe"}, "plan": {"recipe"}}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(target module, line) of every vitkit import in `path`, lazy ones inside functions included."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "vitkit":  # `from .. import validate`: the names are the modules
                for alias in node.names:
                    yield f"vitkit.{alias.name}", node.lineno
            elif target.startswith("vitkit"):
                yield target, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vitkit"):
                    yield alias.name, node.lineno


def _folder(module: str) -> str:
    """The folder (or floor module) a vitkit module belongs to; "" for the package facade (`vitkit/__init__.py`
    and the names it exports, such as `__version__`)."""
    parts = module.split(".")
    if len(parts) < 2:
        return ""
    top = SRC / parts[1]
    return parts[1] if top.is_dir() or top.with_suffix(".py").is_file() else ""


def test_each_folder_imports_only_the_folders_below_it():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        src = _folder(_module(path))
        if src == "":  # vitkit/__init__.py: the public API gathers everything
            continue
        for target, line in _imports(path):
            dst = _folder(target)
            if dst == "":
                ok = src in ("cli", "serve", "__main__")  # only the top (CLI, server) may import the facade
            else:
                ok = dst == src or RANK[dst] < RANK[src] or (RANK[src] == -1 and dst == "errors")
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({src or 'vitkit'}) imports {target}: not below it")
    assert not bad, "\n".join(bad)


def test_no_task_imports_another_task_and_nothing_imports_the_cli():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        mod = _module(path)
        for target, line in _imports(path):
            if target == "vitkit.cli" and mod != "vitkit.__main__":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the CLI")
            if mod.startswith("vitkit.tasks.") and target.startswith("vitkit.tasks."):
                me, other = mod.split(".")[2], target.split(".")[2]
                if other != me and other not in TASK_PARTS.get(me, set()):
                    bad.append(f"{path.relative_to(ROOT)}:{line} (task {me}) imports task {other}")
    assert not bad, "\n".join(bad)


def test_the_readme_map_names_files_and_folders_that_exist():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert len(rows) >= 8, "the README's map of folders is missing"
    missing = []
    for row in rows:
        folder = re.match(r"\| `([^`]+)`", row).group(1)
        where = ROOT / folder
        if not where.exists():
            missing.append(folder)
            continue
        for name in re.findall(r"`([\w/]+\.py)`", row.split("|")[2]):
            base = where if where.is_dir() else where.parent
            if not (base / name).is_file():
                missing.append(f"{folder}{name}")
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)]+)\)", readme)
    missing += [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"the README names what does not exist: {missing}"


def test_every_src_folder_is_on_the_readme_map():
    readme = (ROOT / "README.md").read_text()
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    named = set(re.findall(r"`src/vitkit/(\w+)/`", readme))
    assert folders <= named, f"folders missing from the README's map: {sorted(folders - named)}"
