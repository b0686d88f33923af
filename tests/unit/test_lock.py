"""The environment under test is the one CI tests: every package constraints.txt pins is installed at its release.

A clean clone once failed two tests that CI had passed a week earlier: a fresh install resolved newer releases
(accelerate 1.16.0's single-process launcher, among others, behaved differently). `make install` now installs with
constraints.txt, and this test says at once when the installed set has drifted from it.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            found[canonical(match[1])] = match[2]
    return found


def installed(name: str) -> str | None:
    """The release the import system finds first (setuptools puts its vendored copies of packaging, zipp, ... on
    sys.path too, so a walk over every distribution also meets older releases nobody imports)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_every_locked_package_is_installed_at_its_locked_release():
    lock = os.environ.get("DIFFUSERS_OPTIM_LOCK", "constraints.txt")
    if not lock:
        pytest.skip("installed without the lock (make LOCK=): the releases under test are not CI's")
    locked = pins(ROOT / lock)
    assert "accelerate" in locked and "torch" not in locked  # torch is TORCH_SPEC's (a CUDA build is kept)
    drift = {name: (want, installed(name)) for name, want in locked.items() if installed(name) != want}
    assert not drift, ("installed releases differ from the lock (name: locked, installed); `make install` installs "
                       f"the lock, `make lock` moves it on purpose: {drift}")
