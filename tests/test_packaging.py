"""What `pip install .` ships: the builtin search spaces and the report's template are inside the wheel, and the
default `space: vit` resolves from an installed copy run in another folder, not only from the source checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: run in the installed copy: the default space of a config, resolved on a tiny timm ViT with the plugins that
#: came with the wheel, and where each of those was imported from
RESOLVE_DEFAULT_SPACE = """
import json, timm, autocompress, autocompress_quantization
from autocompress.config import config_from_dict
from autocompress.pluginmanager import load_plugins
from autocompress.space import SearchSpace

config = config_from_dict({"model": {"name": "vit_tiny_patch16_224"}})
space = SearchSpace.load(config.space)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                          num_classes=10, embed_dim=48, depth=2, num_heads=2)
resolved = space.resolve(model, load_plugins().techniques)
print(json.dumps({"space": config.space, "source": space.source, "adapts": space.adapts,
                  "package": autocompress.__file__, "plugin": autocompress_quantization.__file__,
                  "techniques": sorted({d.technique for d in resolved.dimensions})}))
"""


def build_wheel(out: Path, kind: str = "wheel") -> Path:
    code = f"import sys, hatchling.build as b; print(b.build_{kind}(sys.argv[1]))"
    name = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    return out / name


@pytest.mark.slow
def test_the_wheel_carries_the_builtin_spaces_and_an_installed_copy_resolves_space_vit(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for space in sorted((REPO / "search_spaces").glob("*.yaml")):
            assert archive.read(f"autocompress/_spaces/{space.name}") == space.read_bytes(), space.name
        for template in ("report.html.j2", "report.css"):
            assert f"autocompress/report/templates/{template}" in names, template
    # the data travels inside the package: nothing generic becomes importable after install
    assert not any(n.split("/")[0] in ("search_spaces", "plugins", "tests") for n in names)

    # an editable wheel must not carry them: a site-packages/autocompress/ folder without __init__.py would be a
    # namespace package shadowing the redirect to the checkout (see hatch_build.py)
    with zipfile.ZipFile(build_wheel(tmp_path / "editable", "editable")) as archive:
        assert not [n for n in archive.namelist() if n.startswith("autocompress/")]

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
                    "--target", str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", RESOLVE_DEFAULT_SPACE], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["space"] == "vit"
    assert Path(got["source"]) == site / "autocompress" / "_spaces" / "vit.yaml"
    assert got["adapts"], "a builtin space, found in the package, fits itself to the model"
    assert Path(got["package"]).is_relative_to(site) and Path(got["plugin"]).is_relative_to(site)
    assert got["techniques"] == ["distillation", "lowrank", "pruning", "quantization"]
