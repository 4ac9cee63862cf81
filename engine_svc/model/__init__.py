"""kvmesh engine_svc/model."""
