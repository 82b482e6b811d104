"""The package's layering, read from its source: no import cycle, no late import of a qlis
module (a cycle dodged inside a function), and the archive below the compression that
writes it."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

import qlis

ROOT = Path(qlis.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports() -> dict[str, set[str]]:
    """Each module's qlis imports at module level (TYPE_CHECKING blocks left out)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlis"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("qlis")}
        graph[name] = (found & modules.keys()) - {"qlis", name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph[todo.pop()] - seen:
            seen.add(child)
            todo.append(child)
    return seen


def test_no_module_imports_itself_through_others():
    graph = _imports()
    cycles = [name for name in graph if name in _reachable(graph, name)]
    assert not cycles, f"import cycles through {cycles}"


def test_no_qlis_module_is_imported_inside_a_function():
    late = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        guarded = {id(n) for s in tree.body if _type_checking(s) for n in ast.walk(s)}
        for node in ast.walk(tree):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if (any(n == "qlis" or n.startswith("qlis.") for n in names)
                    and id(node) not in top and id(node) not in guarded):
                late.append(f"{_module_name(path)}:{node.lineno}")
    assert not late, f"late imports of qlis modules: {late}"


def test_the_archive_does_not_depend_on_compression_or_policies():
    below = _reachable(_imports(), "qlis.archive.file")
    assert not below & {"qlis.plan.compress", "qlis.plan.policy", "qlis.plan.rd",
                        "qlis.archive.pack"}, below


def test_qlis_info_reads_a_header_without_torch(tmp_path):
    """``qlis info`` (the header alone) must not wait for torch or the codecs' kernels: the
    command table imports only what the command asks for."""
    path = tmp_path / "m.qlis"
    qlis.save(qlis.compress(torch.nn.Linear(8, 8), policy="quant", bits=4), path)
    script = ("import sys; from qlis.cli.main import cli\n"
              f"cli.main(['info', {str(path)!r}], standalone_mode=False)\n"
              "print(sorted(m for m in ('torch', 'numba') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "real ratio" in done.stdout
    assert done.stdout.rstrip().endswith("[]"), done.stdout


def test_every_stage_package_states_its_contract_and_imports_nothing():
    """The layout by stage: each package's ``__init__`` says what belongs there, and imports
    none of its modules (importing one module of a stage must not load the others, nor torch)."""
    packages = [p for p in ROOT.rglob("__init__.py") if p.parent != ROOT]
    assert len(packages) >= 8
    for init in packages:
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init} states no contract"
        imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
                   and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        if init.parent.name != "codecs":  # the codecs register themselves on import
            assert not imports, f"{init} imports {ast.unparse(imports[0])}"


def test_every_package_is_installed():
    """pyproject.toml lists qlis' packages by hand: one left out imports here (an editable
    install finds it) and is missing from a wheel."""
    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for p in ROOT.rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
