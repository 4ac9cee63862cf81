# Sourced on the lent GPU machine from the repository root (`. scripts/device_env.sh`): the image lacks
# some of kvmesh's dependencies, carried as wheels in ./.whl, and ../shared does not travel, so the test
# models are carried as ./models. Leaves PYTHONPATH and KVMESH_TEST_MODELS set for the commands after it.
KVMESH_DEVICE_ROOT=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$KVMESH_DEVICE_ROOT"/.whl/*.whl || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export KVMESH_TEST_MODELS=$KVMESH_DEVICE_ROOT/models
export PYTHONUNBUFFERED=1
