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


def function_lengths(path):
    """{name: lines} of every function and method in a file, decorators and docstring included."""
    tree = ast.parse(path.read_text())
    return {node.name: node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_each_function_fits_a_screen_and_each_line_a_window():
    """A reader sees a function at once: none over 50 lines in the model file, none over 80 in the training loop,
    none over 100 in the report and the explorer; no line over 120 characters in the files read as the reference."""
    limits = {"mmmoe.py": 50, "train.py": 80, "sample.py": 80, "analyze.py": 100, "serve.py": 100}
    for name, limit in limits.items():
        long = {f: n for f, n in function_lengths(ROOT / name).items() if n > limit}
        assert not long, f"{name}: functions over {limit} lines: {long}"
    for name in ("mmmoe.py", "train.py", "sample.py", "analyze.py", "serve.py", "pipeline.py", "tests/reference.py"):
        wide = [i + 1 for i, line in enumerate((ROOT / name).read_text().splitlines()) if len(line) > 120]
        assert not wide, f"{name}: lines over 120 characters: {wide}"
