"""The package as a user gets it: `python -m build` makes an sdist from a copy of what the
repository ships, and the wheel from that sdist (so the sdist holds what a build needs); the
wheel goes into a fresh venv, and the README's captioning sample runs with it against the mock.

Built once for the module (some seconds of setuptools), with the build backend of this venv
(`--no-isolation`: nothing is fetched). The fresh venv is offline too: the dependencies it
needs are this venv's, seen through a folder of links (the package itself left out) that pip
resolves the wheel's requirements against (`--no-index`: one not there fails the install).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import orjson
import pytest

import pipeline
from tests.conftest import FAKE_KEY, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
NAME = "chat-pipeline"  # on the package index; the package and the command stay `pipeline`
SHIPPED = ("pyproject.toml", "README.md", "pipeline")
OWN = ("pipeline", "chat_pipeline", "__editable__", "__pycache__")  # this venv's install of it


def _needs_build_tools() -> None:
    """`build` and setuptools>=68 come with the dev dependencies (`make`); without them the
    test skips, but not in CI, where `make` installed them."""
    missing = importlib.util.find_spec("build") is None
    if not missing:
        import setuptools

        missing = int(setuptools.__version__.split(".")[0]) < 68
    if missing:
        if os.environ.get("CI"):
            pytest.fail("python -m build needs build and setuptools>=68: make installs them")
        pytest.skip("python -m build needs build and setuptools>=68 (make installs them)")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_build_tools()
    src = tmp_path_factory.mktemp("src")
    for name in SHIPPED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _one(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


def test_the_sdist_holds_what_a_build_needs(dist: Path) -> None:
    sdist = _one(dist, "chat_pipeline-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names
    shipped = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "pipeline").rglob("*")
        if path.suffix in (".py", ".lua") and "__pycache__" not in path.parts
    }
    assert {"pipeline/pace/store.lua", "pipeline/pace/store_read.lua"} <= shipped
    assert shipped - names == set()


def test_the_wheel_says_its_name_version_and_that_pillow_is_needed(dist: Path) -> None:
    wheel = _one(dist, "chat_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"chat_pipeline-{pipeline.__version__}.dist-info/METADATA").decode()
        entry = z.read(f"chat_pipeline-{pipeline.__version__}.dist-info/entry_points.txt").decode()
        names = set(z.namelist())
    assert f"Name: {NAME}\n" in meta
    assert f"Version: {pipeline.__version__}\n" in meta  # pipeline/__init__.py's, the one place
    pillow = [line for line in meta.splitlines() if line.lower().startswith("requires-dist: pillow")]
    assert pillow, "Pillow is a plain dependency"
    assert all("extra ==" not in line for line in pillow)
    assert "pipeline = pipeline.cli:main" in entry
    assert "pipeline/pace/store.lua" in names


def _needed(wheel: Path) -> set[str]:
    """The distributions a plain install of the wheel brings (its requirements without extras,
    and theirs), by this venv's copies of them."""
    from email.parser import Parser
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"chat_pipeline-{pipeline.__version__}.dist-info/METADATA").decode()
    todo = Parser().parsestr(meta).get_all("Requires-Dist") or []
    found: set[str] = set()
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # (pip's --no-index install says so)
        name = dist.metadata["Name"].lower()
        if name not in found:
            found.add(name)
            todo += dist.requires or []
    return found


def _fresh_venv(folder: Path, wheel: Path) -> Path:
    """A venv without pip (this one's pip installs into it), with only the dependencies a plain
    install of the wheel brings in reach: this venv's copies of them, linked (a dependency the
    wheel forgets to declare is then missing, as on a user's machine)."""
    from importlib.metadata import distribution

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    deps = folder / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    tops: set[str] = set()
    for name in _needed(wheel):
        files = distribution(name).files
        assert files is not None, f"{name} has no RECORD"
        tops |= {f.parts[0] for f in files if f.parts and f.parts[0] != ".."}
    for top in sorted(tops):
        if (site / top).exists() and not top.lower().startswith(OWN) and not top.endswith(".pth"):
            (deps / top).symlink_to(site / top)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (folder / "lib" / version / "site-packages" / "deps.pth").write_text(f"{deps}\n")
    return folder / "bin"


async def _run(*args: str, cwd: Path) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env={**env, "LUMENFALL_API_KEY": FAKE_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_wheel_in_a_fresh_venv_runs_the_captioning_sample(dist: Path, mock, tmp_path: Path) -> None:
    wheel = _one(dist, "chat_pipeline-*.whl")
    bin_ = _fresh_venv(tmp_path / "venv", wheel)
    code, out, err = await _run(
        sys.executable, "-m", "pip", "--python", str(bin_ / "python"), "install", "--quiet", "--no-index",
        str(wheel), cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, out + err
    for name in ("jobs", "samples"):
        shutil.copytree(ROOT / name, tmp_path / name)
    code, out, err = await _run(
        str(bin_ / "python"), "-c", "import importlib.metadata as m, pipeline; "
        f"print(m.version({NAME!r}), pipeline.__file__)", cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    version, where = out.split()
    assert version == pipeline.__version__
    assert Path(where).is_relative_to(tmp_path / "venv/lib")  # the wheel's, not this checkout's
    code, out, _ = await _run(str(bin_ / "pipeline"), "--version", cwd=tmp_path)
    assert (code, out.strip()) == (0, f"pipeline {pipeline.__version__}")
    async with mock() as (url, server):
        code, out, err = await _run(
            str(bin_ / "pipeline"), "run", "jobs/caption.toml", "--base-url", url, "--output", "out/caption",
            "--quiet", cwd=tmp_path,
        )  # fmt: skip
    assert code == 0, out + err
    lines = (tmp_path / "samples/catalogue.jsonl").read_text().splitlines()
    assert len(read_jsonl(tmp_path / "out/caption/results.jsonl")) == len([x for x in lines if x.strip()])
    usage = orjson.loads((tmp_path / "out/caption/usage.json").read_bytes())
    # The job sizes its images (Pillow, checked for before anything is sent); its two local
    # files, already under 512 px, go as they are.
    assert usage["images"]["count"] == 2
    sent = orjson.dumps([body["messages"] for body in server.state.received]).decode()
    assert sent.count('"url":"data:image/png;base64,') == 2
