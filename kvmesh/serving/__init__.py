"""Plumbing every kvmesh service shares: server bootstrap, error mapping, channels, config."""
