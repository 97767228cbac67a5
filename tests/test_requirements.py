"""The install files: torch is named in one file only (so no `pip install -r ...` replaces a user's
own torch), CI installs it before the test requirements, and the tests' optional raster reader is
installed with them."""

from __future__ import annotations

import os
import re

import pytest

from conftest import ROOT


def _names(path) -> list[str]:
    """The package names a requirements file lists (options, comments and includes left out)."""
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower())
    return names


def test_only_the_cpu_torch_file_names_torch():
    files = sorted(ROOT.glob("requirements*.txt"))
    naming = [p.name for p in files if {"torch", "torchvision"} & set(_names(p))]
    assert naming == ["requirements-torch-cpu.txt"]
    assert _names(ROOT / "requirements-torch-cpu.txt") == ["torch"]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in (ROOT / "requirements-torch-cpu.txt").read_text()
    conda = (ROOT / "requirements.yml").read_text()
    assert "- pytorch" in conda and "requirements-torch-cpu" not in conda  # conda-forge picks CPU or CUDA itself


def test_ci_installs_torch_first_and_the_tests_get_rasterio():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("pip install -q -r requirements-torch-cpu.txt") < ci.index("pip install -q -r requirements-test.txt")
    assert "rasterio" in _names(ROOT / "requirements-test.txt")


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI must have every test requirement (rasterio is optional)")
def test_ci_has_rasterio_so_the_geotiff_and_jpeg2000_tests_run():
    import rasterio

    assert "JP2OpenJPEG" in rasterio.drivers.raster_driver_extensions().values()
