"""README's install lines give a newcomer what README's test command needs, with the versions CI pins, and CI
installs the project through those same lines (``.ci/readme-block`` reads a fenced block of README.md after its
``<!-- marker -->``; ``.ci/run`` runs the install block, then the test command)."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="needs Python ≥ 3.11 (tomllib) to read pyproject.toml")

ROOT = Path(__file__).resolve().parents[1]


def _block(marker: str) -> list[str]:
    """The commands of the fenced block after ``<!-- marker -->`` in README.md, comments dropped."""
    r = subprocess.run(["bash", str(ROOT / ".ci" / "readme-block"), marker], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln.split(" #")[0].strip() for ln in r.stdout.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(extras: set[str]) -> list[Requirement]:
    """The project's dependencies plus those of ``extras`` (extras naming the project itself expanded)."""
    project = _project()
    reqs, todo, seen = [Requirement(r) for r in project["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["optional-dependencies"][extra]):
            if r.name == project["name"]:
                todo += sorted(r.extras)
            else:
                reqs.append(r)
    return reqs


def _installed_by_readme() -> tuple[list[Requirement], set[str]]:
    """What README's install block asks pip for: the project's requirements with the extras it names, and the
    other packages it names."""
    reqs, others = None, set()
    for line in _block("install-command"):
        args = shlex.split(line)
        assert args[:2] == ["pip", "install"], line
        pkgs = [a for a in args[2:] if not a.startswith("-")]
        for p in pkgs:
            m = re.fullmatch(r"\.(?:\[([\w,\-]+)\])?", p)
            if m:
                reqs = _requirements(set(filter(None, (m.group(1) or "").split(","))))
                assert "-e" in args, f"{line}: install the checkout editable (-e), as the tests import it"
            else:
                others.add(Requirement(p).name)
    assert reqs is not None, "README's install block does not install the project (pip install -e '.[...]')"
    return reqs, others


def _spec(reqs, name) -> SpecifierSet:
    """The versions of ``name`` that all of ``reqs`` allow on Linux."""
    linux = {"platform_system": "Linux"}
    found = [r for r in reqs if r.name == name and (r.marker is None or r.marker.evaluate(linux))]
    assert found, f"{name} is not installed by README's install lines"
    spec = SpecifierSet()
    for r in found:
        spec &= r.specifier
    return spec


def test_readme_install_brings_what_the_test_command_runs():
    reqs, others = _installed_by_readme()
    test = _block("test-command")
    assert len(test) == 1, test
    args = shlex.split(test[0])
    assert args[:2] == ["python", "-m"], test[0]
    runner = args[2]
    assert runner in {r.name for r in reqs} | others, f"README's install lines do not install {runner}"


def test_readme_install_pins_what_ci_pins():
    reqs, _ = _installed_by_readme()
    triton = _spec(reqs, "triton")                       # the Triton the kernels (and Gluon's API) are tested with
    assert Version("3.6.0") in triton and Version("3.7.0") not in triton and Version("3.9.0") not in triton, triton
    assert not [r for r in reqs if r.name == "triton" and r.marker is None], "triton installs on Linux only"
    numpy = _spec(reqs, "numpy")                         # Triton 3.6's interpreter breaks on numpy 2.4
    assert Version("2.3.5") in numpy and Version("2.4.0") not in numpy, numpy


def test_ci_installs_through_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    code = [ln.split("#")[0] for ln in ci.splitlines()]
    assert any("readme-block" in ln and "install-command" in ln for ln in code), \
        ".ci/run does not run README's install block"
    assert any("readme-block" in ln and "test-command" in ln for ln in code), ".ci/run does not run README's tests"
    installs = [ln for ln in code if re.search(r"pip install", ln)]
    assert not [ln for ln in installs if re.search(r"(^|\s)(-e\s+)?\.(\s|$|\[)", ln)], \
        f".ci/run installs the project itself instead of through README: {installs}"
    assert "torch==2.13.0" in ci, "CI installs the CPU torch first"
