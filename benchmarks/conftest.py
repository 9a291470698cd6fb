"""Benchmarks live in `bench_*.py` files (kept out of the test run's `test_*.py` pattern): collect them here."""
import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is already collected by pytest itself: don't collect it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
