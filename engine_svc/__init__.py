"""kvmesh engine tier: continuous batching over a paged KV cache, served over gRPC."""
