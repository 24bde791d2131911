"""Security: nothing reaches the network at run time; plugins come only from installed entry points; checkpoints are
read with ``weights_only=True`` and YAML with the safe loader everywhere in the package; every file the package writes
is written atomically (through ``autocompress.io``).

The static checks read the package's source (``ast``), so a new module that forgets the rule fails here."""

from __future__ import annotations

import ast
import importlib.metadata
import socket
import sys
from pathlib import Path

import pytest

from autocompress.cli import main
from autocompress.compose import load_compressed
from autocompress.config import config_from_dict
from autocompress.pluginmanager import ENTRY_POINT_GROUP, load_plugins

from reliability_support import cfg, small_fmnist, write_yaml  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parent.parent
PACKAGE_SOURCES = sorted([*(REPO / "autocompress").rglob("*.py"), *(REPO / "plugins").rglob("*.py")])


# --- network ----------------------------------------------------------------------------------------------------------


def test_search_and_apply_make_no_network_connection(cfg, tmp_path, monkeypatch, capsys):
    attempts: list[str] = []

    def refuse(name):
        def blocked(*args, **kwargs):
            attempts.append(f"{name}{args[1:] if name.startswith('socket.') else args}")
            raise OSError(f"network access during a run: {name}")
        return blocked

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse(f"socket.{name}"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    with pytest.raises(OSError):  # the guard is in place
        socket.create_connection(("example.org", 80))
    attempts.clear()

    from autocompress.search import search

    cfg["search"]["trials"] = 3
    result = search(config_from_dict(cfg), budget="memory=1.0x", progress=False, log=lambda _: None)
    assert result.feasible
    run_dir = Path(cfg["out"])
    config = write_yaml(tmp_path / "config.yaml", cfg)
    small = tmp_path / "small.pt"
    code = main(["apply", str(run_dir / "best_policy.yaml"), "--config", str(config), "--out", str(small)])
    assert code == 0, capsys.readouterr().err
    model, policy = load_compressed(small, load_plugins().techniques)
    assert policy.to_dict() == result.best_policy.to_dict()
    assert attempts == []


# --- plugins ----------------------------------------------------------------------------------------------------------


def test_plugins_come_only_from_installed_entry_points(tmp_path, monkeypatch):
    # a module that looks like a plugin, importable but not installed as an entry point, is never loaded
    (tmp_path / "autocompress_sneaky.py").write_text(
        "import autocompress\n"
        "from autocompress_quantization import QuantizationTechnique\n"
        "class Sneaky(QuantizationTechnique):\n    name = 'sneaky'\n"
        "@autocompress.hookimpl\ndef autocompress_register_techniques(register):\n    register(Sneaky())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()
    assert "sneaky" not in plugins.techniques
    assert "autocompress_sneaky" not in sys.modules
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    for info in plugins.info:
        assert info.name in installed, f"{info.name} was not loaded from the {ENTRY_POINT_GROUP!r} group"
        dist = installed[info.name].dist
        assert dist is not None and info.distribution == dist.name
    owners = set(plugins.owners.values())
    assert owners <= set(installed)


# --- static checks over the package's source --------------------------------------------------------------------------


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    """``torch.load`` for ``torch.load(...)``, ``.write_text`` for ``x.write_text(...)``, ``open`` for ``open(...)``."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        base = func.value.id if isinstance(func.value, ast.Name) else ""
        return f"{base}.{func.attr}"
    return ""


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_every_checkpoint_load_is_weights_only():
    bad = []
    for path in PACKAGE_SOURCES:
        for call in _calls(path):
            if _name(call.func) == "torch.load":
                flag = {k.arg: k.value for k in call.keywords}.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(_where(path, call))
            if _name(call.func) in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                bad.append(_where(path, call))
    assert bad == [], f"checkpoints must load with torch.load(..., weights_only=True): {bad}"


def test_yaml_is_read_with_the_safe_loader_only():
    bad = []
    for path in PACKAGE_SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            if name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
                bad.append(_where(path, call))
    assert bad == [], f"use yaml.safe_load: {bad}"


#: writers that put bytes in a file by themselves; in the package they may only run inside autocompress.io
_WRITERS = {".write_text", ".write_bytes", ".to_csv", ".to_json", ".to_parquet", ".to_pickle", ".savefig",
            "torch.save", "np.save", "numpy.save", "json.dump", "pickle.dump", "shutil.copy", "shutil.copyfile",
            "shutil.copy2", "shutil.move"}
#: Ray Tune asks the searcher to write its state to a path Tune chooses and manages (see ray_searcher.py)
_EXEMPT = {("autocompress/search/ray_searcher.py", "save")}


def _opens_for_writing(call: ast.Call) -> bool:
    name = _name(call.func)
    if name not in ("open", ".open", "io.open", "gzip.open", "os.fdopen"):
        return False
    position = 1 if name in ("open", "io.open", "gzip.open", "os.fdopen") else 0
    mode = call.args[position] if len(call.args) > position else {k.arg: k.value for k in call.keywords}.get("mode")
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax+")


def _yaml_dump_to_stream(call: ast.Call) -> bool:
    return _name(call.func) in ("yaml.dump", "yaml.safe_dump") and (
        len(call.args) > 1 or any(k.arg == "stream" for k in call.keywords))


def test_every_file_the_package_writes_is_written_atomically():
    """A write outside ``autocompress/io.py`` must happen in the ``write(tmp)`` callback handed to
    ``atomic_write`` (a lambda, or a function whose parameter is named ``tmp``)."""
    bad = []
    for path in PACKAGE_SOURCES:
        rel = str(path.relative_to(REPO))
        if rel == "autocompress/io.py":
            continue
        tree = ast.parse(path.read_text(), rel)
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func).endswith("atomic_write"):
                for arg in node.args[1:]:
                    allowed |= {id(n) for n in ast.walk(arg)}
            if isinstance(node, (ast.FunctionDef, ast.Lambda)) and "tmp" in [a.arg for a in node.args.args]:
                allowed |= {id(n) for n in ast.walk(node)}
            if isinstance(node, ast.FunctionDef) and (rel, node.name) in _EXEMPT:
                allowed |= {id(n) for n in ast.walk(node)}
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            writes = _name(call.func) in _WRITERS or _opens_for_writing(call) or _yaml_dump_to_stream(call)
            if writes and id(call) not in allowed:
                bad.append(f"{rel}:{call.lineno} {_name(call.func)}")
    assert bad == [], f"write through autocompress.io.atomic_write*: {bad}"


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    from autocompress.io import atomic_write, atomic_write_text

    target = tmp_path / "trials.csv"
    atomic_write_text(target, "number\n0\n")

    def half_then_crash(tmp: str) -> None:
        Path(tmp).write_text("number\n0\n1\n2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "number\n0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]  # no temporary file left behind
    assert target.stat().st_mode & 0o777 != 0o600  # the usual permissions, not mkstemp's private ones
