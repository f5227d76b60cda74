#!/usr/bin/env bash
# Copy a bench run's report, references and contact sheets into docs/bench (the committed
# reference report) and its report.json into the package (what `advise` reads by default).
#   bash scripts/publish_bench.sh runs/bench
set -euo pipefail
run="${1:?usage: publish_bench.sh RUN_DIR}"
cd "$(dirname "$0")/.."
[ -f "$run/report.json" ] || { echo "no report.json in $run" >&2; exit 1; }
rm -rf docs/bench && mkdir -p docs/bench
cp "$run"/report.json "$run"/report.md "$run"/report.html docs/bench/
cp -r "$run"/references docs/bench/
for sheet in "$run"/cells/*/series/contact_sheet.png; do
  cell="$(basename "$(dirname "$(dirname "$sheet")")")"
  mkdir -p "docs/bench/cells/$cell/series" && cp "$sheet" "docs/bench/cells/$cell/series/"
done
cp "$run"/report.json src/consistent_diffusion/assets/bench/report.json
echo "published $(ls docs/bench/cells | wc -l) cells to docs/bench"
