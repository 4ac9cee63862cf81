"""Fixtures for the reliability tests: a per-test cluster of real processes, logs shown on failure."""

from __future__ import annotations

import pytest

from tests.reliability.cluster import Cluster


@pytest.fixture
def cluster(stories260k_dir, tmp_path, request):
    c = Cluster(stories260k_dir, tmp_path)
    yield c
    c.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(c.logs()[-20000:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
