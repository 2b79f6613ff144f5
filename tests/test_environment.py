"""The environment is code: requirements/lock.txt (what `make` installs) answers pyproject.toml's ranges."""

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent
LOCK = ROOT / "requirements" / "lock.txt"


def locked() -> dict[str, str]:
    """{package: version} of the lock's pins."""
    pins = [line.split("==") for line in LOCK.read_text().splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    return {canonicalize_name(name): version.strip() for name, version in pins}


def installed_extras() -> list[str]:
    """The extras `make` installs (the Makefile's EXTRAS)."""
    line = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("EXTRAS :="))
    return line.split(":=")[1].split()


def test_every_dependency_make_installs_is_locked_at_a_version_pyproject_allows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in installed_extras():
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = locked()
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name == "torch":  # installed first, its build chosen by the user (TORCH=...): not in the lock
            continue
        assert name in pins, f"{name} is in pyproject.toml but not in the lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"the lock's {name}=={pins[name]} is outside pyproject.toml's {requirement}: run `make lock`"
        )


def test_the_lock_leaves_torch_to_the_user_and_pins_the_installers():
    pins = locked()
    assert "torch" not in pins
    # a CUDA build's dependencies would make a CPU machine download gigabytes: the lock is compiled against torch's
    # CPU build
    assert not [name for name in pins if name.startswith(("nvidia-", "triton", "cuda-"))]
    assert {"pip", "uv"} <= set(pins)  # make installs the lock's pip; `make lock` runs the lock's uv
