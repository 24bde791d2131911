"""The layer rules of REVIEW.md, read from the code's own imports (every import, at module level or in a function):

- the report is built from the run directory alone (``autocompress.rundir``): it never imports ``autocompress.search``;
- ``runner`` and ``latency_model`` use each other's public names only, and ``latency_model`` does not import
  ``runner`` at all (the run's inputs are loaded by ``autocompress.inputs``), so the two do not form a loop;
- no module imports another module's private (``_name``) helper.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "autocompress"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``path``, relative ones resolved."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out += [(base, alias.name, node.lineno) for alias in node.names]
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_rules_see_every_module_and_their_imports():
    """A guard for the checks below: the parser finds the package and reads the imports the rules are about."""
    names = {module_name(p) for p in MODULES}
    assert {"autocompress.runner", "autocompress.rundir", "autocompress.report.rundata",
            "autocompress.latency_model.profiler", "autocompress.search"} <= names
    found = imports(PACKAGE / "report" / "rundata.py")
    assert any(module == "autocompress.rundir" for module, _, _ in found)
    assert ("autocompress.inputs", "load_space") in {(m, n) for m, n, _ in imports(PACKAGE / "runner.py")}


@pytest.mark.parametrize("path", [p for p in MODULES if within(module_name(p), "autocompress.report")],
                         ids=lambda p: module_name(p))
def test_the_report_does_not_import_the_search(path):
    bad = [f"line {line}: {module}" for module, name, line in imports(path)
           if within(module, "autocompress.search") or (module == "autocompress" and name == "search")]
    assert not bad, f"{module_name(path)} imports the search (read the run through autocompress.rundir): {bad}"


def test_runner_and_latency_model_do_not_form_a_loop_or_share_private_names():
    bad = []
    for path in MODULES:
        here = module_name(path)
        for module, name, line in imports(path):
            if within(here, "autocompress.latency_model") and module == "autocompress.runner":
                bad.append(f"{here}:{line} imports autocompress.runner")
            if here == "autocompress.runner" and within(module, "autocompress.latency_model") \
                    and name is not None and name.startswith("_"):
                bad.append(f"{here}:{line} imports the private {module}.{name}")
    assert not bad, bad


def test_no_module_imports_another_modules_private_helper():
    """A helper two modules need is public in the module it belongs to (``yaml_error_where`` in errors.py, not
    ``policy._yaml_where``). The search backends' Optuna modules are left to their own restructuring."""
    allowed = {"autocompress.search.shared_study"}  # optuna_backend's _TrialFailed, _quiet_failed_trial_warnings
    bad = []
    for path in MODULES:
        here = module_name(path)
        if here in allowed:
            continue
        for module, name, line in imports(path):
            if within(module, "autocompress") and module != here and name and name.startswith("_") \
                    and not name.startswith("__"):
                bad.append(f"{here}:{line} imports {module}.{name}")
    assert not bad, bad
