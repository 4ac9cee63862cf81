"""kvmesh: shared wire package (generated kvmesh.v1 stubs) and service plumbing."""

__version__ = "0.1.0"
