"""An engine's load: the snapshot the engine takes after each step, and its one mapping to and from
the kvmesh.v1.LoadReport proto.

The engine thread builds a LoadSnapshot; the service turns it into a LoadReport (adding its engine
id, a sequence number and its clock); the router turns a report back into a LoadSnapshot. The load
fields are named once, in LOAD_FIELDS, so that the engine, the proto and the router cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.v1 import common_pb2

# The fields a LoadSnapshot and a LoadReport share, by the same names.
LOAD_FIELDS = ("block_size", "total_blocks", "free_blocks", "cached_blocks", "in_use_blocks", "reserved_blocks",
               "num_running_requests", "num_waiting_requests", "num_running_tokens", "num_waiting_tokens")


@dataclass(slots=True, frozen=True)
class LoadSnapshot:
    """The engine's load after a step or a command. Built on the engine thread, read by the service
    and (mapped from its report) by the router."""

    version: int  # increases with every snapshot (from a report: the report's sequence)
    block_size: int
    total_blocks: int
    free_blocks: int
    cached_blocks: int
    in_use_blocks: int
    reserved_blocks: int  # growth the running requests still need to reach max_tokens
    num_running_requests: int
    num_waiting_requests: int
    num_running_tokens: int
    num_waiting_tokens: int
    # Prefix cache since start, in tokens (cumulative; engine side only, not in LOAD_FIELDS): metrics.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    def counts(self) -> tuple:
        """Everything but the version and the block size: equal counts mean "no change" for WatchLoad."""
        return tuple(getattr(self, name) for name in LOAD_FIELDS[1:])


def to_report(snapshot: LoadSnapshot | None, *, engine_id: str, sequence: int, engine_time: float,
              draining: bool) -> common_pb2.LoadReport:
    """The LoadReport of a snapshot (None before the engine's first snapshot: counts left at zero)."""
    report = common_pb2.LoadReport(engine_id=engine_id, sequence=sequence, engine_time=engine_time,
                                   draining=draining)
    if snapshot is not None:
        for name in LOAD_FIELDS:
            setattr(report, name, getattr(snapshot, name))
    return report


def from_report(report: common_pb2.LoadReport) -> LoadSnapshot:
    """The snapshot a LoadReport carries; its version is the report's sequence."""
    return LoadSnapshot(report.sequence, *(getattr(report, name) for name in LOAD_FIELDS))
