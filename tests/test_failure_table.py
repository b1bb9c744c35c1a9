"""The failure table in docs/failures.md cannot drift from the code: every row names a test that
exists, and every quoted message appears word for word in the toolkit's source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "\n".join(p.read_text(encoding="utf-8") for folder in ("common", "precompute", "shards", "train", "evaluation", "extrapolate", "embedded")
                   for p in sorted((ROOT / folder).rglob("*.py")))


def table_rows() -> list[list[str]]:
    rows = []
    for line in (ROOT / "docs" / "failures.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 4 and cells[3].startswith("tests/"):
            rows.append(cells)
    return rows


ROWS = table_rows()


def test_the_table_has_the_cases():
    assert len(ROWS) >= 30
    commands = " ".join(r[0] for r in ROWS)
    for command in ("wspo-precompute", "wspo-train", "wspo-shards", "wspo-extrapolate", "wspo-eval"):
        assert command in commands


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}:{r[1][:40]}" for i, r in enumerate(ROWS)])
def test_each_row_names_a_real_test_and_a_real_message(row):
    command, bad_input, sees, test = row
    path, _, name = test.partition("::")
    test_file = ROOT / path
    assert test_file.exists(), f"{test}: no such test file"
    assert re.search(rf"^def {re.escape(name)}\(", test_file.read_text(encoding="utf-8"), re.M), f"{test}: no such test"
    quoted = re.findall(r"`([^`]+)`", sees)
    assert quoted, f"row {bad_input!r}: quote the message the user sees in backticks"
    for fragment in quoted:
        assert fragment in SOURCE, f"row {bad_input!r}: message {fragment!r} is not in the toolkit's source"
