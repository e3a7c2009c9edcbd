#!/usr/bin/env bash
# The whole loop on one failing network: the circles study, then its deep sigmoid network under
# the Probe, its diagnosis, its report, and the doctor's cure. Needs `gradprobe` and `python` on
# PATH (scripts/main.sh sets that up). Everything lands under $1 (default results/).
# HEADLINE_QUICK=1 runs it at a small size (the tests do).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-results}"
mkdir -p "$out"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "${HEADLINE_QUICK:-0}" = 1 ]; then
    circles=(--epochs 2 --seeds 1)
    export DEEP_SIGMOID_EPOCHS=3
    doctor=(--max-remedies 2)
else
    circles=()
    doctor=()
fi
run="$out/deep-sigmoid/run"

echo "== 1/4 the circles study (figures and tables in $out/circles)"
gradprobe lab run circles --out "$out/circles" "${circles[@]}"

echo
echo "== 2/4 a deep sigmoid network under the Probe, and its diagnosis"
python "$root/examples/deep_sigmoid.py" "$run"
gradprobe diagnose "$run"
gradprobe diagnose "$run" --json > "$out/deep-sigmoid/diagnosis.json"

echo
echo "== 3/4 the report"
gradprobe report "$run" -o "$out/deep-sigmoid/report.html"

echo
echo "== 4/4 the doctor: the remedies the findings name, each re-run and compared"
gradprobe doctor "$root/examples/deep_sigmoid.py" --out "$out/doctor" "${doctor[@]}"

cat > "$out/README.md" <<MD
# What is here

Made by \`bash scripts/main.sh\` (the whole loop, from a network that fails to train to its cure).

| file | what it shows |
|---|---|
| \`circles/\` | the circles study (the study notes' tutorial): \`accuracy_loss.png\`, \`part2_gradients.png\`, \`part2_weights.png\`, tables (\`main.md\`) and the recorded runs |
| \`deep-sigmoid/run/\` | the run of the deep sigmoid network (\`examples/deep_sigmoid.py\`) recorded by \`gp.Probe\`: Parquet parts, \`meta.json\`, \`events.jsonl\` |
| \`deep-sigmoid/diagnosis.json\` | its diagnosis (\`gradprobe diagnose RUN --json\`): findings, evidence, remedies |
| \`deep-sigmoid/report.html\` | its report: the diagnosis, then gradients per layer over steps, the layer x step heat map, the depth profile, weights, activations, the loss (one offline file) |
| \`doctor/report.html\` | the doctor's comparison: the baseline beside every remedy it tried (loss curves, depth profiles, findings) |
| \`doctor/doctor.json\` | the doctor's table: each remedy, the findings before and after, the final loss |
| \`doctor/<remedy>/\` | the run of each remedy |
MD
echo
echo "index of what was written: $out/README.md"
