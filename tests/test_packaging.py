"""The built wheel: it carries every architecture file of `models/` and loads them by name.

An editable install reads `capfilt/model/configs`, a symlink to `models/`, so only a wheel built
from the tree shows whether packaging copies the files (package-data) byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from capfilt.model import get_config

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted((REPO / "models").glob("*.json"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this tree, built offline from a copy (so no build/ or egg-info lands in the tree)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("capfilt", "models"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=skip)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run([*cmd, "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("capfilt-*.whl")
    return path


def test_the_wheel_holds_every_model_file_byte_for_byte(wheel: Path) -> None:
    assert MODELS, "models/ holds the architecture files"
    with zipfile.ZipFile(wheel) as z:
        packaged = {Path(n).name: z.read(n) for n in z.namelist() if n.startswith("capfilt/model/configs/")}
    assert sorted(packaged) == [p.name for p in MODELS]
    for p in MODELS:
        assert packaged[p.name] == p.read_bytes(), f"{p.name} differs in the wheel"


def test_the_installed_wheel_loads_every_model_by_name(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    names = [p.stem for p in MODELS]
    probe = (
        "import json, sys, capfilt\n"
        "from capfilt.model.config import config_dirs, get_config, list_configs\n"
        "print(json.dumps({'file': capfilt.__file__, 'dirs': [str(d) for d in config_dirs()],\n"
        "  'names': list_configs(), 'configs': {n: get_config(n).model_dump() for n in sys.argv[1:]}}))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", probe, *names],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert Path(got["file"]).is_relative_to(site), "the wheel's capfilt, not the source tree's"
    assert got["dirs"] == [str(site / "capfilt" / "model" / "configs")], "only the packaged copies"
    assert got["names"] == sorted(names)
    for name in names:
        assert got["configs"][name] == json.loads(json.dumps(get_config(name).model_dump())), name
