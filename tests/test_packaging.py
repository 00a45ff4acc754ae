"""The package list in pyproject.toml is explicit (so the shipped model can be mapped into the package):
every folder of npdiff/ that holds Python modules must be named there, or a non-editable install
would silently leave it out."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def listed_packages():
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r"^packages = \[(.*?)\]", text, re.S | re.M)
    assert match, "pyproject.toml has no explicit [tool.setuptools] packages list"
    return set(re.findall(r'"([^"]+)"', match.group(1)))


def test_every_python_package_is_listed():
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "npdiff").rglob("__init__.py")}
    missing = found - listed_packages()
    assert not missing, f"add to pyproject.toml [tool.setuptools] packages: {sorted(missing)}"


def test_listed_packages_exist():
    text = (ROOT / "pyproject.toml").read_text()
    mapped = dict(re.findall(r'"([^"]+)" = "([^"]+)"', text.split("package-dir", 1)[1].split("\n")[0]))
    for name in listed_packages():
        folder = ROOT / mapped.get(name, name.replace(".", "/"))
        assert folder.is_dir(), f"pyproject.toml lists package {name} but {folder} does not exist"


def test_shipped_model_is_mapped_into_the_package():
    from npdiff import pipeline_utils

    text = (ROOT / "pyproject.toml").read_text()
    assert f'"npdiff.{pipeline_utils.INSTALLED_MODEL_DIR}" = "weights/{pipeline_utils.SHIPPED_MODEL_NAME}"' in text
