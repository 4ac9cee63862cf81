"""The `kvmesh` command: client (generate) and local-cluster (up) subcommands."""
