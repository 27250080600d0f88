#!/usr/bin/env bash
# Two code trees end to end on one machine, alternately: the 8B-shape model is saved once,
# then each round runs `e2e.py` (this tree's bench) with this tree's engine ("new") and with
# BASE's ("base": a folder holding that commit's compat/ and worker/, e.g. from
# `git archive COMMIT compat worker | tar x -C BASE`), for each configuration. Device
# timings are compared only within one machine; this gives both figures from the same one.
#
#   bash bench/e2e_ab.sh BASE OUT_DIR [ROUNDS] [CONFIGS]
#
# CONFIGS: "plain default" (default); ROUNDS: 2. One JSON line a run in OUT_DIR/runs.jsonl,
# each with "tree" and "round" added; each run's log in OUT_DIR.
set -u
base=$(cd "${1:?usage: bash bench/e2e_ab.sh BASE OUT_DIR [ROUNDS] [CONFIGS]}" && pwd)
out=${2:?usage: bash bench/e2e_ab.sh BASE OUT_DIR [ROUNDS] [CONFIGS]}
rounds=${3:-2}
configs=${4:-plain default}
here=$(pwd)
mkdir -p "$out"
: > "$out/runs.jsonl"
for round in $(seq 1 "$rounds"); do
    for config in $configs; do
        for tree in new base; do
            root=$here
            [ "$tree" = base ] && root=$base
            flag=""
            [ "$config" = plain ] && flag=--plain
            log="$out/$config-$tree-$round.txt"
            PYTHONPATH="$root/compat:$root/worker:$here/operator:$here:${EXTRA_PYTHONPATH:-}" \
                timeout 240 python3 bench/e2e.py --shape llama-3-8b $flag --dir /tmp/e2e-ab \
                --verbose --keep --reuse --bytecode-cache "/tmp/e2e-ab-pyc-$tree" > "$log" 2>&1
            echo "$config $tree round $round rc=$?"
            tail -1 "$log" | python3 -c "import json, sys
r = json.loads(sys.stdin.read()); r.update(tree='$tree', round=$round)
print(json.dumps(r))" >> "$out/runs.jsonl" 2>/dev/null
        done
    done
done
python3 - "$out/runs.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'config':8} {'tree':5} {'round':5} {'wall':>6} {'to 1st':>6} {'1st':>5} "
      f"{'s/layer':>7} {'write+val':>9} {'exit':>5} {'rss':>5}")
for r in rows:
    after = r["wall_s"] - r["to_first_layer_s"] - r["layers_s"] - r["write_validate_s"]
    print(f"{r['config']:8} {r['tree']:5} {r['round']:5} {r['wall_s']:6.2f} "
          f"{r['to_first_layer_s']:6.2f} {r['layer_s'][0]:5.2f} {r['s_per_layer_median']:7.3f} "
          f"{r['write_validate_s']:9.2f} {after:5.2f} {r['peak_rss_gib']:5.2f}")
PY
rm -rf /tmp/e2e-ab
