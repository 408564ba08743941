"""The install contract: ranges in requirements*.txt, the locks that pin them, the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SETS = sorted(p.stem for p in ROOT.glob("requirements*.txt"))


def ranges(name: str) -> dict[str, Requirement]:
    """The requirements of ``name``.txt, following ``-r`` includes."""
    out = {}
    for line in (ROOT / f"{name}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            out |= ranges(Path(line[2:].strip()).stem)
        elif line:
            requirement = Requirement(line)
            out[canonicalize_name(requirement.name)] = requirement
    return out


def locked(name: str) -> dict[str, list[tuple[Version, str]]]:
    """Each package of ``name``.lock with its (version, marker) lines (one per Python range)."""
    out: dict[str, list[tuple[Version, str]]] = {}
    for line in (ROOT / f"{name}.lock").read_text().splitlines():
        pin, _, marker = line.split("#")[0].strip().partition(";")
        if pin:
            package, version = pin.strip().split("==")
            out.setdefault(canonicalize_name(package), []).append((Version(version),
                                                                   marker.strip()))
    return out


def test_every_requirement_set_has_a_lock():
    assert "requirements" in SETS and "requirements-dev" in SETS
    for name in SETS:
        assert (ROOT / f"{name}.lock").is_file(), f"{name}.lock is missing: run scripts/lock"


@pytest.mark.parametrize("name", SETS)
def test_the_lock_pins_every_requirement_within_its_range(name):
    """A range edited without re-locking (or a lock edited by hand) fails here."""
    lock = locked(name)
    for package, requirement in ranges(name).items():
        assert package in lock, f"{package} is not in {name}.lock: run scripts/lock"
        for version, marker in lock[package]:
            assert requirement.specifier.contains(version, prereleases=True), (
                f"{name}.lock pins {package}=={version} ({marker or 'all'}) outside "
                f"'{requirement.specifier}': run scripts/lock")


@pytest.mark.parametrize("name", [s for s in SETS if s != "requirements-dev"])
def test_every_lock_agrees_with_the_dev_lock(name):
    """CI tests the dev lock; the app's install must not pick other versions of anything."""
    dev, lock = locked("requirements-dev"), locked(name)
    for package, pins in lock.items():
        if package in dev:
            assert pins == dev[package], f"{package}: {name}.lock {pins}, dev lock {dev[package]}"


def test_the_readme_commands_install_through_the_locks():
    readme = (ROOT / "README.md").read_text()
    assert ("python -m pip install -r requirements.txt -c requirements.lock -e . "
            "&& streamlit run app.py") in readme
    assert ("python -m pip install -r requirements-dev.txt -c requirements-dev.lock -e . "
            "&& python -m pytest") in readme


def test_the_readme_cpu_torch_hint_names_the_locked_versions():
    """The CPU build must satisfy the lock's pins, or the app's install swaps in a CUDA one."""
    readme = (ROOT / "README.md").read_text()
    hint = re.search(r"pip install (torch==\S+) (torchvision==\S+) --index-url (\S+)", readme)
    assert hint, "the README lost its CPU-build hint"
    lock = locked("requirements")
    for pin in hint.group(1, 2):
        package, version = pin.split("==")
        assert [v for v, _ in lock[package]] == [Version(version)], (pin, lock[package])
    assert hint.group(3).rstrip("`").endswith("/whl/cpu")
