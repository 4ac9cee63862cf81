"""kvmesh tokenizer_svc."""
