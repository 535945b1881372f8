"""One registry line per ERP drives everything: an API ERP's name appears only in its connector
module, its simulator module, its tests, its `specs/<erp>/` folder and its registry line."""

import re
import subprocess
from pathlib import Path

import pytest

from erp_pipelines.config import env_example
from erp_pipelines.registry import ERPS, api_erps

ROOT = Path(__file__).resolve().parent.parent
SHARED_TESTS = {"tests/conftest.py"}  # with tests/contract/: run for every ERP, so they name none
CODE = (".py", ".toml", ".yaml", ".yml", ".cfg", ".sh", "Makefile", ".graphql", ".json")


def _project_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in listed if name.endswith(CODE) and (ROOT / name).is_file()]


def _allowed(path: Path, erp: str) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return (
        relative in (f"erp_pipelines/erps/{erp}.py", f"erp_pipelines/sandbox/{erp}.py")
        or relative.startswith(f"specs/{erp}/")
        or (relative.startswith("specs/") and not relative.endswith(".py"))  # vendors' documents, not our code
        or (relative.startswith("tests/") and relative not in SHARED_TESTS and not relative.startswith("tests/contract/"))
        or (relative.startswith("bench/") and erp in Path(relative).name)  # e.g. bench/<erp>_peers.py
    )


@pytest.mark.parametrize("erp", [spec.name for spec in api_erps()])
def test_an_erps_name_stands_only_in_its_own_modules_and_its_registry_line(erp):
    pattern = re.compile(rf"{erp}", re.IGNORECASE)
    strays = []
    for path in _project_files():
        if _allowed(path, erp):
            continue
        lines = [n for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
        if path.relative_to(ROOT).as_posix() == "erp_pipelines/registry.py" and len(lines) == 1:
            continue
        strays += [f"{path.relative_to(ROOT)}:{n}" for n in lines]
    assert strays == [], f"{erp} is named outside its own modules: {strays}"


def test_every_api_erp_has_a_simulator_and_a_spec_folder():
    for spec in api_erps():
        assert spec.simulator_class.erp == spec.name == spec.connector_class.erp
        assert (ROOT / "specs" / spec.name).is_dir()


def test_env_example_is_written_from_the_registry():
    text = (ROOT / ".env.example").read_text()
    assert text == env_example(), "regenerate it: python -m erp_pipelines env-example > .env.example"
    for spec in ERPS.values():
        for setting in spec.connector_class.settings:
            assert setting.env in text
