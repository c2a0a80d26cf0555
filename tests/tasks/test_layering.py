"""Tasks share through lower modules (data, io, train, models, tasks/images), never through each other."""
import re
from pathlib import Path

TASKS = Path(__file__).resolve().parents[2] / "src" / "vitkit" / "tasks"
OWN = {"classify": {"plan", "recipe"}, "plan": {"recipe"}}  # classify's recipe and planner are its own parts


def test_no_task_imports_another_task():
    names = {p.stem for p in TASKS.glob("*.py")} - {"__init__", "images"}
    offenders = []
    for path in TASKS.glob("*.py"):
        for other in re.findall(r"from \.(\w+) import", path.read_text()):
            if other in names and other != path.stem and other not in OWN.get(path.stem, set()):
                offenders.append(f"{path.name} imports .{other}")
    assert offenders == []
