"""The two wheels this repository builds: the library's holds the library only, tokenmerge-bench's
holds the bench and its data. (.ci/run checks the same on the wheels it installs, and that every
subpackage imports from them.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what a wheel build reads, per distribution (copied, so no build/ folder of an earlier build in
#: the checkout can leak files that have since left a package)
SOURCES = {
    "tokenmerge": ["pyproject.toml", "README.md", "tokenmerge", "strategies", "adapters"],
    "tokenmerge-bench": ["benchmarks/pyproject.toml", "benchmarks/tokenmerge_bench"],
}


def _build(dist: str, tmp_path: Path) -> zipfile.ZipFile:
    source = tmp_path / "source"
    for name in SOURCES[dist]:
        path, target = ROOT / name, source / Path(name).name
        if path.is_dir():
            shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, target)
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), "."],
        cwd=source, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _top_level(names: list[str]) -> set[str]:
    return {name.split("/")[0] for name in names if ".dist-info/" not in name}


def test_the_library_wheel_holds_the_library_only(tmp_path):
    wheel = _build("tokenmerge", tmp_path)
    names = wheel.namelist()
    assert _top_level(names) == {"tokenmerge"}
    data = [n for n in names if ".dist-info/" not in n and not n.endswith(".py")]
    assert data == [], f"package data in the library wheel: {data}"
    assert not [n for n in names if n.startswith(("tokenmerge/bench/", "tokenmerge/reference/"))]
    assert {"tokenmerge/strategies/retom.py", "tokenmerge/adapters/generic.py"} <= set(names)
    size = Path(wheel.filename).stat().st_size
    assert size <= 300_000, f"the library wheel is {size} bytes zipped, over 300 KB"


def test_the_bench_wheel_holds_the_bench_and_its_data(tmp_path):
    wheel = _build("tokenmerge-bench", tmp_path)
    names = set(wheel.namelist())
    assert _top_level(list(names)) == {"tokenmerge_bench"}
    data = {f"tokenmerge_bench/data/{name}" for name in (
        "astronaut_256.pt", "coffee_256.pt", "chelsea_256.pt", "reference_photos.pt",
        "reference_denoiser.safetensors", "reference_vit.safetensors", "PHOTOS.md",
        "digit_flux.safetensors", "digit_dit.safetensors", "digit_vit.safetensors",
        "digit_judge.safetensors", "DIGITS.md")}  # fmt: skip
    assert data <= names, sorted(data - names)
    assert {"tokenmerge_bench/commands.py", "tokenmerge_bench/reference/models.py"} <= names
    metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    assert b"[tokenmerge.commands]\nbench = tokenmerge_bench.commands" in metadata
