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


def _section(doc: str, heading: str) -> str:
    start = doc.index(f"\n## {heading}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start : end if end >= 0 else None]


def test_the_config_reference_documents_every_section_and_key() -> None:
    import dataclasses

    from shmbroker._broker import config
    from shmbroker.limits import Limits

    doc = (ROOT / "docs" / "config.md").read_text()
    keys = {
        "`[broker]`": config._BROKER_KEYS,
        "`[status]`": config._STATUS_KEYS,
        "`[channels.NAME]`": config._CHANNEL_KEYS,
        "`[[rules]]`": config._RULE_KEYS,
    }
    headings = {"broker": "`[broker]`", "status": "`[status]`", "limits": "`[limits]`", "channels": "`[channels.NAME]`", "rules": "`[[rules]]`"}
    assert set(headings) == set(config.SECTIONS), "a section was added: document it and list it here"
    for heading in headings.values():
        _section(doc, heading)
    missing = [f"{heading} {key}" for heading, names in keys.items() for key in names if f"| `{key}` |" not in _section(doc, heading)]
    limits = _section(doc, "`[limits]`")
    for field in dataclasses.fields(Limits):
        row = re.search(rf"^\| `{field.name}` \| ([^|]+) \|", limits, re.M)
        if row is None:
            missing.append(f"[limits] {field.name}")
        elif not row.group(1).startswith(str(field.default)):
            missing.append(f"[limits] {field.name}: the documented default {row.group(1)!r} is not {field.default}")
    assert missing == []


def test_one_config_path_everywhere() -> None:
    """The README, the docs, the CLI's help and the systemd unit name the same file."""
    from shmbroker import cli

    unit = (ROOT / "examples" / "systemd" / "shmbroker.service").read_text()
    assert f"--config {cli.CONFIG_PATH}" in unit
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"/etc/[\w./-]*\.toml", doc.read_text()):
            assert path == cli.CONFIG_PATH, f"{doc.name} names {path}"
    assert cli.CONFIG_PATH in (ROOT / "README.md").read_text()
