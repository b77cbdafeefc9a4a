"""The scripts under ``scripts/`` are files, not modules of the package: ``load_script`` loads one."""
import importlib.util
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def load_script():
    """``load_script(name)``: ``scripts/<name>.py`` as a module."""
    return _load
