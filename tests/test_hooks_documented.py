"""Every hook in autocompress/hookspecs.py is documented in docs/hooks.md and exercised by a test (datasette's habit).

A hook counts as documented when docs/hooks.md has a heading naming it and mentions each of its arguments in that
section; as exercised when some test module defines ``test_hook_<hook name>``.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from autocompress import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS_DOC = ROOT / "docs" / "hooks.md"


def _hooks() -> dict[str, list[str]]:
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: list(inspect.signature(fn).parameters)
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, marker)
    }


def _doc_sections() -> dict[str, str]:
    """Heading text -> the section under it (up to the next heading of the same or a higher level)."""
    text = HOOKS_DOC.read_text()
    heads = list(re.finditer(r"^(#{1,6}) (.+)$", text, flags=re.M))
    sections = {}
    for i, head in enumerate(heads):
        level = len(head.group(1))
        end = next((h.start() for h in heads[i + 1 :] if len(h.group(1)) <= level), len(text))
        sections[head.group(2)] = text[head.end() : end]
    return sections


def _test_functions() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_hook_"):
                names.add(node.name)
    return names


def test_there_are_hooks_to_check() -> None:
    assert "autocompress_register_techniques" in _hooks()


@pytest.mark.parametrize("hook", sorted(_hooks()))
def test_hook_is_documented(hook: str) -> None:
    sections = {heading: body for heading, body in _doc_sections().items() if re.search(rf"\b{hook}\b", heading)}
    assert sections, f"docs/hooks.md has no heading for {hook}"
    body = "".join(sections.values())
    for arg in _hooks()[hook]:
        assert re.search(rf"\b{arg}\b", body), f"docs/hooks.md does not describe argument {arg!r} of {hook}"


@pytest.mark.parametrize("hook", sorted(_hooks()))
def test_hook_is_exercised_by_a_test(hook: str) -> None:
    assert f"test_hook_{hook}" in _test_functions(), f"no test named test_hook_{hook} under tests/"


def test_documented_hooks_exist() -> None:
    """A documented hook that was renamed or removed is a lie in the docs."""
    documented = set(re.findall(r"^#+ `(autocompress_\w+)\(", HOOKS_DOC.read_text(), flags=re.M))
    assert documented == set(_hooks())


def test_writing_a_plugin_example_passes_the_contract(tmp_path: Path) -> None:
    """The guide's files, written out as they are shown, make a plugin that passes the contract suite."""
    import os
    import subprocess
    import sys

    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    written = []
    for block in re.findall(r"```(?:python|toml)\n(.*?)```", guide, flags=re.S):
        first, _, body = block.partition("\n")
        path = re.fullmatch(r"# ([\w./-]+\.(?:py|toml))", first.strip())
        if path:
            target = tmp_path / path.group(1)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block)
            written.append(path.group(1))
    assert sorted(written) == ["pyproject.toml", "src/autocompress_blockdrop/__init__.py", "tests/test_contract.py"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b(\d+) passed", proc.stdout) and " failed" not in proc.stdout
