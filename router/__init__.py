"""kvmesh router."""
