"""The pure modules (wire, reassembly, and errors which both use) touch no I/O.

STYLE.md habit 1: ``wire`` and ``reassembly`` import neither asyncio nor socket
nor os, and a test proves it: in a fresh interpreter (so nothing else has
imported them first) and in their source text.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "vfio_multifd"
PURE = ("core/wire", "core/decoder", "core/queue", "core/reassembly", "core/memory", "ops/manifest")
#: Modules a pure module may import from inside the package (paths under it).
#: (the decoder sizes RAM headers, and keeps its events and field checks beside it)
PURE_CLOSURE = {*PURE, "errors", "core/ram", "core/savevm", "core/decoder_events", "core/decoder_checks"}
#: Never in sys.modules after importing only the pure modules.
IO_MODULES = ("asyncio", "socket", "selectors", "ssl", "subprocess")
#: Never imported by the pure modules' source.
FORBIDDEN_IMPORTS = {
    "os", "asyncio", "socket", "selectors", "ssl", "subprocess", "io",
    "pathlib", "shutil", "tempfile", "mmap", "threading", "signal",
    "uvloop", "structlog", "importlib",
}

_REPORT = f"""
import json, sys
print(json.dumps({{name: name in sys.modules for name in {list(IO_MODULES)!r}}}))
"""


def _run(code: str, *flags: str) -> dict[str, bool]:
    result = subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PACKAGE_DIR.parent,
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, bool] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def test_fresh_interpreter_starts_without_io_modules() -> None:
    # The baseline the checks below rely on: -I -S loads no site packages.
    loaded = _run(_REPORT, "-I", "-S")
    assert not any(loaded.values()), loaded


def test_pure_modules_alone_import_no_io_modules() -> None:
    # A stand-in package object, so only the modules themselves (not the
    # package's __init__) are imported.
    code = f"""
import sys, types
package = types.ModuleType("vfio_multifd")
package.__path__ = [{str(PACKAGE_DIR)!r}]
sys.modules["vfio_multifd"] = package
import vfio_multifd.core.wire, vfio_multifd.core.reassembly
assert vfio_multifd.core.wire.__file__.startswith({str(PACKAGE_DIR)!r})
loaded = sorted(m.split(".", 1)[1] for m in sys.modules if m.startswith("vfio_multifd."))
assert loaded == ["core", "core.queue", "core.reassembly", "core.wire", "errors"], loaded
""" + _REPORT
    loaded = _run(code, "-I", "-S")
    assert loaded == {name: False for name in IO_MODULES}


def test_importing_pure_modules_through_the_package_imports_no_io_modules() -> None:
    loaded = _run("import vfio_multifd.core.wire, vfio_multifd.core.reassembly" + _REPORT)
    assert loaded == {name: False for name in IO_MODULES}


#: Calls that import a module by name at run time, whatever the name.
DYNAMIC_IMPORTS = {"__import__", "importlib.import_module"}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """Top-level absolute imports and intra-package imports of a module (a path under
    the package, without .py), the latter as such paths."""
    package = module.split("/")[:-1]
    return _imports_of((PACKAGE_DIR / f"{module}.py").read_text(), f"{module}.py", package)


def _imports_of(
    source: str, filename: str = "<test>", package: list[str] | None = None
) -> tuple[set[str], set[str]]:
    """What ``source`` imports: absolute (with ``DYNAMIC_IMPORTS`` for a call that
    imports by name) and intra-package, as paths under the package (``package``:
    the importing module's own subpackage, which relative imports start from)."""
    package = package or []
    tree = ast.parse(source, filename=filename)
    absolute: set[str] = set()
    relative: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                if node.module.split(".")[0] == "vfio_multifd":
                    relative.add("/".join(node.module.split(".")[1:]))
                else:
                    absolute.add(node.module.split(".")[0])
                continue
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                relative.add("/".join([*base, *node.module.split(".")]))
            else:  # from . import x
                relative.update("/".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == "__import__":
                absolute.add("__import__")
            elif name == "import_module":  # importlib.import_module, or imported bare
                absolute.add("importlib.import_module")
    return absolute, relative


def _closure() -> set[str]:
    seen: set[str] = set()
    todo = list(PURE)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(_imports(module)[1])
    return seen


@pytest.mark.parametrize("module", sorted(PURE_CLOSURE))
def test_source_imports_nothing_that_does_io(module: str) -> None:
    absolute, _ = _imports(module)
    assert absolute, f"{module}.py parsed to no imports at all"
    assert not absolute & FORBIDDEN_IMPORTS, f"{module}.py imports {absolute & FORBIDDEN_IMPORTS}"
    assert not absolute & DYNAMIC_IMPORTS, f"{module}.py imports by name at run time"


@pytest.mark.parametrize(
    "source",
    [
        "import importlib\ndef f():\n    return importlib.import_module('socket')\n",
        "from importlib import import_module\nsock = import_module('socket')\n",
        "import importlib as il\nil.import_module('os')\n",
        "def f():\n    return __import__('os')\n",
    ],
)
def test_imports_by_name_are_caught(source: str) -> None:
    absolute, _ = _imports_of(source)
    assert absolute & DYNAMIC_IMPORTS


def test_pure_modules_import_only_pure_siblings() -> None:
    closure = _closure()
    assert closure <= PURE_CLOSURE, f"pure modules reach {closure - PURE_CLOSURE}"
    assert set(PURE) <= closure
