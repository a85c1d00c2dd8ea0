"""The test tree itself: `pytest tests` (the README's test command) collects every file."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_files_share_a_basename():
    # tests/ has no __init__.py files, so pytest's default (prepend) import mode imports each test
    # file by its basename: two files with one name stop the whole run at collection.
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
