"""What a distributor checks before packaging (issue 15): a license file,
metadata, README links that still work where PyPI shows the README, and a
unit whose Documentation= the package installs.  The wheel itself is built
and installed outside the checkout by `make smoke` and `make test-systemd`."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_license_file_and_metadata() -> None:
    project = PYPROJECT["project"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639: the expression instead
    assert "Operating System :: POSIX :: Linux" in project["classifiers"]
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(project["urls"])


def test_readme_links_survive_on_pypi_and_name_files_that_exist() -> None:
    """PyPI renders README.md away from the repository, so relative links break
    there; absolute links into the repository must name files that exist."""
    base = PYPROJECT["project"]["urls"]["Source"].rstrip("/") + "/blob/main/"
    links = LINK.findall((REPO / "README.md").read_text())
    assert links
    relative = [link for link in links if not link.startswith(("https://", "http://", "#"))]
    assert relative == [], "relative links break on PyPI"
    for link in links:
        if link.startswith(base):
            assert (REPO / link[len(base):].split("#")[0]).exists(), link


def test_the_units_documentation_is_installed_by_the_package() -> None:
    """Documentation= names /usr/share/doc/shmbroker/...: the wheel's data
    files put the docs under the install prefix, /usr for a distribution's
    /usr/bin/shmbroker (make test-systemd checks the installed file)."""
    unit = (REPO / "examples" / "systemd" / "shmbroker.service").read_text()
    (uri,) = re.findall(r"^Documentation=(.*)$", unit, re.MULTILINE)
    setup = (REPO / "setup.py").read_text()
    assert 'data_files=[("share/doc/shmbroker", DOCS)]' in setup and '"docs/*.md"' in setup
    for item in uri.split():
        assert item.startswith("file:///usr/share/doc/shmbroker/"), item
        assert (REPO / "docs" / item.rsplit("/", 1)[1]).is_file(), item
