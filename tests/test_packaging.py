"""A wheel must carry every subpackage and the bundled data (the package list is explicit
because the data folders are mapped into the package)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages() -> set:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(cfg["tool"]["setuptools"]["packages"])


def test_every_subpackage_is_declared():
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "simcost").rglob("__init__.py")}
    missing = found - _declared_packages()
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_bundled_data_is_declared():
    pk = _declared_packages()
    assert {"simcost._data.models_zoo", "simcost._data.hardware_profiles",
            "simcost._data.published"} <= pk
