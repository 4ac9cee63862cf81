"""The benchmark scripts import as `bench.<name>` from the repository root (bench/ is no installed
package): put the root on sys.path however pytest was started."""

import gc
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kvmesh.serving import heap  # noqa: E402


@pytest.fixture(autouse=True)
def heap_handed_back():
    """A benchmark freezes the collector's view of the heap after building its engine, as
    `kvmesh-engine` does (kvmesh/serving/heap.py); gc.freeze is process-wide, so each test here gives the
    heap back for the tests after it."""
    yield
    if gc.get_freeze_count():
        heap.unfreeze_heap()
