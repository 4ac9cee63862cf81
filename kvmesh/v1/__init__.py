"""Generated stubs of the kvmesh.v1 wire contract (protos/kvmesh/v1). Regenerate with
scripts/gen_protos.sh; CI fails when regenerating changes anything."""

# Bump with every change to the kvmesh.v1 protos; reported by GetInfo on every service.
SCHEMA_REVISION = 5
