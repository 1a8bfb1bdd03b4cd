"""Shared pytest configuration for the Python tests.

* ``@pytest.mark.slow`` marks tests with larger grids; they are skipped unless ``NPUFA_SLOW=1``.
"""
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: larger grids, skipped unless NPUFA_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("NPUFA_SLOW", "") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set NPUFA_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
