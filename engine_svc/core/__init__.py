"""kvmesh engine_svc/core."""
