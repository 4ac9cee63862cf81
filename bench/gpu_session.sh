#!/usr/bin/env bash
# One lent-GPU call's worth of runs, in the order the open issues need them (a machine start costs
# minutes and a session has ~30 min of device time, so each part fits one 600 s call). On the device:
#
#   . scripts/device_env.sh && KVMESH_COMMIT=<sha> bash bench/gpu_session.sh verify
#
# Parts (each writes its JSON and logs under $OUT, named with the date and KVMESH_COMMIT):
#   verify    the GPU suite (kernels, runner, engine), then the ShareGPT-like mix (step_profile.py)
#   kernels   bench/kernels.py's decode and prefill sections; with .base/ (an extracted `kernels/` of
#             an earlier commit: `git archive <sha> kernels | tar -x -C .base`) the base kernels beside
#   overhead  the router/tokenizer overhead with a GPU engine (8 client processes), then per-hop TTFT
#   unix      the same two, each with a second router that reaches the tokenizer on a unix socket
#             (--compare-unix-tokenizer), then grpc_floor.py on tcp and unix and with no gRPC
#   ttft      kernels_engine.py (TTFT 2k / 8k at batch 1, decode B=256) of a whole earlier tree in
#             .base-tree/ (`git archive <sha> engine_svc kernels kvmesh | tar -x -C .base-tree`) and of this
#             one, alternating, twice (carry .base-tree)
# Each run has its own timeout, so a slow one leaves the others their time.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_session.sh verify|kernels|overhead|unix|ttft}
tag="h200-$(date -u +%Y-%m-%d)-${KVMESH_COMMIT:?set KVMESH_COMMIT to the commit under test}"
out=${OUT:?run on the device machine, where OUT is set}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
models=${KVMESH_TEST_MODELS:?source scripts/device_env.sh first}

# run SECONDS NAME COMMAND...: one run under a timeout; its output in $out/NAME.log, its tail here.
run() {
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $? after ${SECONDS}s of the call"
  tail -n 15 "$out/$name.log"
}

case $part in
  verify)
    run 330 "gpu-tests-$tag" python3 -m pytest -m gpu --ignore=tests/cluster -q -rf -p no:cacheprovider
    run 240 "step-profile-$tag" python3 bench/step_profile.py --device cuda --model bench/configs/llama3-8b \
      --load-format dummy --out "$out/step-profile-llama3-8b-$tag.json"
    ;;
  kernels)
    base=()
    [ -d .base/kernels ] && base=(--baseline .base)
    run 560 "kernels-$tag" python3 bench/kernels.py --sections decode,prefill "${base[@]}" \
      --out "$out/kernels-$tag.json"
    ;;
  overhead)
    run 400 "overhead-$tag" python3 bench/overhead.py --model "$models/stories260k" --device cuda --rounds 3 \
      --client-procs 8 --out "$out/overhead-$tag-clients8.json"
    run 150 "ttft-hops-$tag" python3 bench/ttft_hops.py --model "$models/stories260k" --device cuda \
      --samples 100 --out "$out/ttft-hops-$tag.json"
    ;;
  unix)
    run 150 "ttft-hops-unix-$tag" python3 bench/ttft_hops.py --model "$models/stories260k" --device cuda \
      --samples 200 --compare-unix-tokenizer --out "$out/ttft-hops-unix-$tag.json"
    run 300 "overhead-unix-$tag" python3 bench/overhead.py --model "$models/stories260k" --device cuda --rounds 3 \
      --client-procs 8 --compare-unix-tokenizer --out "$out/overhead-unix-$tag-clients8.json"
    run 120 "grpc-floor-$tag" python3 bench/grpc_floor.py --options kvmesh --transports tcp,unix --repeats 3 \
      --round-trips 400 --out "$out/grpc-floor-unix-raw-$tag.json"
    ;;
  ttft)
    [ -d .base-tree/engine_svc ] || { echo "gpu_session.sh ttft: extract a base tree into .base-tree first" >&2; exit 2; }
    for pass in 1 2; do  # alternating, so a drift of the machine shows as a gap between the passes
      for tree in .base-tree .; do
        label=$([ "$tree" = . ] && echo "$KVMESH_COMMIT" || echo base)
        PYTHONPATH=$PWD/$tree:$PYTHONPATH run 150 "kernels-engine-$label-pass$pass-$tag" python3 bench/kernels_engine.py \
          --label "$label" --max-model-len 8192 --reps 10 --decode-steps 5 \
          --out "$out/kernels-engine-$label-pass$pass-$tag.json"
      done
    done
    ;;
  *)
    echo "gpu_session.sh: unknown part $part (verify, kernels, overhead, unix, ttft)" >&2
    exit 2
    ;;
esac
