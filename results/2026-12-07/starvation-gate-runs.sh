#!/bin/bash
# the starvation gate in fresh boots on the default path: validate --workload cpu --rounds 1 --budget 0
# (the first 19 runs in starvation-gate-runs.txt took 3 of each starving scheduler; runs 4-5 came after)
OUT=$1; mkdir -p $OUT; S=/work/main/.venv/bin/schedcp; FIX=/work/main/tests/fixtures/bpf_l2
log() { echo "== $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg) :: $*" | tee -a "$OUT/log.txt"; }
one() { # name n args...
  name=$1; n=$2; shift 2
  for i in $(seq ${FROM:-1} $n); do
    $S validate "$@" --workload cpu --rounds 1 --budget 0 --no-cache --json > "$OUT/$name-$i.json" 2>/dev/null
    log "$name $i rc=$? $(python3 -c "
import json; d=json.load(open('$OUT/$name-$i.json')); l=d.get('layer2') or {}; l1=d.get('layer1') or {}
g=[x for x in l.get('correctness',[]) if x['name'] in ('no_starvation','no_stall')]
print('L1', l1.get('verdict'), '|', ' | '.join(f\"{x['name']} {'pass' if x['passed'] else 'FAIL'}: {x['reason'][:140]}\" for x in g) or (d.get('status') or '')[:200])" 2>&1)"
  done
}
aa() { for i in $(seq ${FROM:-1} $1); do
  $S bench aa --rounds 1 --workload cpu --json > "$OUT/default-$i.json" 2>/dev/null
  log "default(A/A) $i rc=$? $(python3 -c "
import json; d=json.load(open('$OUT/default-$i.json')); s=d['starvation']; print('pass' if s['passed'] else 'FAIL', s['reason'][:160])" 2>&1)"
done; }
# `ONLY=starving FROM=4 starvation-gate-runs.sh OUT` takes runs 4-5 of the starving schedulers alone
if [ "$ONLY" != starving ]; then aa 5; one lean_preempt 5 --policy lean_preempt; fi
one starve_timer 5 $FIX/starve_timer.bpf.c
one starve_kthreads 5 $FIX/starve_kthreads.bpf.c
one lean_preempt_1431b7b 5 $FIX/lean_preempt_1431b7b.bpf.c
