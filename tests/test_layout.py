"""The house rules of the code base: scripts never import scripts, modules never import in a circle."""
import ast

from conftest import ROOT

SCRIPTS = {"train", "sample", "analyze", "bench", "prepare"}


def local_imports():
    """{module: the project's modules it imports anywhere in the file, function-level imports included}"""
    files = {p.stem: p for p in ROOT.glob("*.py")} | {"data": ROOT / "data" / "__init__.py", "prepare": ROOT / "data" / "openmoji" / "prepare.py"}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = found & set(files) - {name}
    return graph


def test_no_script_imports_another_and_there_is_no_circle():
    graph = local_imports()
    assert SCRIPTS <= set(graph)
    for script in SCRIPTS:
        assert not graph[script] & SCRIPTS, (script, graph[script])
    done = set()
    while len(done) < len(graph):  # peel off modules whose imports are all peeled off: only a circle stops it
        ready = {m for m in graph if m not in done and graph[m] <= done}
        assert ready, f"import circle among {sorted(set(graph) - done)}"
        done |= ready


def test_the_model_file_stays_one_sitting():
    assert len((ROOT / "mmmoe.py").read_text().splitlines()) <= 700
