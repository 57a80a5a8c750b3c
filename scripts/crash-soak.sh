#!/usr/bin/env bash
# Crash soak: runs the crash-at-any-moment test (tools/tests/crash_any_moment.rs)
# for many kill cycles, in release mode (faster restarts and checks).
#
#   scripts/crash-soak.sh                    # 300 cycles, random seed
#   CYCLES=1000 scripts/crash-soak.sh
#   SEED=123456 scripts/crash-soak.sh        # replay a seed
#   PHASES=churn,publish,fetch,mixed scripts/crash-soak.sh   # some phases only
#
# Phases: startup, fresh, churn, publish, fetch, mixed. The seed is printed
# first and with any failure; the same SEED (and CYCLES, PHASES) replays the
# same schedule of phases and kill moments.
set -euo pipefail
cd "$(dirname "$0")/.."

CYCLES=${CYCLES:-300}
SEED=${SEED:-$(( ( (RANDOM << 15) | RANDOM ) % 1000000000 ))}
export CRASH_CYCLES=$CYCLES CRASH_SEED=$SEED
if [[ -n ${PHASES:-} ]]; then
    export CRASH_PHASES=$PHASES
fi

echo "crash-soak: CRASH_SEED=$SEED CRASH_CYCLES=$CYCLES${PHASES:+ CRASH_PHASES=$PHASES}" >&2
status=0
cargo test --release -p skiff-tools --test crash_any_moment -- --nocapture || status=$?
if [[ $status -ne 0 ]]; then
    echo "crash-soak: FAILED; replay with SEED=$SEED CYCLES=$CYCLES${PHASES:+ PHASES=$PHASES} $0" >&2
fi
exit $status
