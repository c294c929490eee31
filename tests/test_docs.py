"""The docs name the tests that prove each claim; those tests must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `tests/test_x.py::test_name[param]`, `test_x.py`, or `::test_name` (same file as the last one named).
REFERENCE = re.compile(r"`(?:tests/)?(test_\w+\.py)(?:::(\w+))?(?:\[[^\]]*\])?`|`::(\w+)(?:\[[^\]]*\])?`")


def references() -> list[tuple[str, str, str | None]]:
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        current = None
        for match in REFERENCE.finditer(doc.read_text()):
            if match.group(1):
                current = match.group(1)
                found.append((doc.name, current, match.group(2)))
            elif current is not None:
                found.append((doc.name, current, match.group(3)))
    return found


def test_every_test_named_in_the_docs_exists() -> None:
    refs = references()
    assert len(refs) > 50, "the reference pattern no longer matches how the docs name tests"
    missing = []
    for doc, filename, name in refs:
        path = ROOT / "tests" / filename
        if not path.exists() or (name and not re.search(rf"^\s*(async )?def {name}\(", path.read_text(), re.M)):
            missing.append(f"{doc}: {filename}::{name}")
    assert missing == []
