"""The builtin techniques come through the 'autocompress' entry-point group, like a third party's."""

import importlib.metadata
import subprocess
import sys

import pytest

import autocompress
from autocompress.pluginmanager import ENTRY_POINT_GROUP, load_plugins
from autocompress.technique import Stage


def test_quantization_is_registered_through_the_entry_point_group():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert eps["quantization"].value == "autocompress_quantization"
    plugins = load_plugins()
    info = {p.name: p for p in plugins.info}
    assert info["quantization"].distribution == "autocompress"
    assert info["quantization"].techniques == ("quantization",)
    assert plugins.techniques["quantization"].stage is Stage.FORMAT


def test_core_never_imports_a_plugin_module():
    code = (
        "import sys, autocompress, autocompress.search, autocompress.cli, autocompress.runner; "
        "print([m for m in sys.modules if m.startswith('autocompress_')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_generic_names_are_not_importable_after_install():
    for name in ("plugins", "search_spaces", "tests"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd="/")
        assert proc.returncode != 0, f"'{name}' must not be importable"


def test_blocking_a_plugin_by_name_and_by_env(monkeypatch):
    assert "quantization" not in load_plugins(block=["quantization"]).techniques
    monkeypatch.setenv("AUTOCOMPRESS_BLOCK_PLUGINS", "quantization, other")
    assert "quantization" not in load_plugins().techniques


def test_duplicate_technique_names_are_refused_with_both_plugins_named():
    from autocompress_quantization import QuantizationTechnique

    class Twin:
        __name__ = "twin"

        @autocompress.hookimpl
        def autocompress_register_techniques(self, register):
            register(QuantizationTechnique())

    plugins = load_plugins(extra=[Twin()])
    bad = [p for p in plugins.info if p.name == "twin"][0]
    assert "already registered by plugin 'quantization'" in bad.error
    assert "quantization" in plugins.techniques  # the first one still works


def test_misspelt_hook_is_reported_and_does_not_break_the_others():
    class Misspelt:
        __name__ = "misspelt"

        @autocompress.hookimpl
        def autocompress_register_technique(self, register):  # missing 's'
            raise AssertionError("never called")

    plugins = load_plugins(extra=[Misspelt()])
    bad = [p for p in plugins.info if p.name == "misspelt"][0]
    assert bad.error and "autocompress_register_technique" in bad.error
    assert "quantization" in plugins.techniques


def test_cli_lists_plugins(capsys):
    from autocompress.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("quantization")][0]
    assert "autocompress" in line and "format" in line and line.rstrip().endswith("ok")


@pytest.mark.parametrize("command", [[], ["search"], ["apply"], ["plugins"]])
def test_every_command_has_help(command, capsys):
    from autocompress.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: autocompress" in capsys.readouterr().out


def test_autocompress_search_stays_the_function_after_backends_are_imported():
    code = ("import autocompress, autocompress.search.optuna_backend, autocompress.search.study; "
            "assert callable(autocompress.search), type(autocompress.search)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_importing_autocompress_does_not_import_optuna_or_ray():
    code = "import autocompress, sys; print([m for m in sys.modules if m.split('.')[0] in ('optuna', 'ray')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
