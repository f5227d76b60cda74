#!/usr/bin/env bash
# Copy a bench run's report, references and contact sheets into a docs folder. docs/bench (the
# default) is the committed evidence, the standard suite's report, and its report.json also goes
# into the package (what `advise` reads by default); docs/bench-quick holds the quick suite's.
#   bash scripts/publish_bench.sh runs/standard               # -> docs/bench + the package
#   bash scripts/publish_bench.sh runs/bench docs/bench-quick  # the quick smoke view
set -euo pipefail
run="${1:?usage: publish_bench.sh RUN_DIR [DEST (default docs/bench)]}"
dest="${2:-docs/bench}"
cd "$(dirname "$0")/.."
[ -f "$run/report.json" ] || { echo "no report.json in $run" >&2; exit 1; }
rm -rf "$dest" && mkdir -p "$dest"
cp "$run"/report.json "$run"/report.md "$run"/report.html "$dest"/
cp -r "$run"/references "$dest"/
for sheet in "$run"/cells/*/series/contact_sheet.png; do
  cell="$(basename "$(dirname "$(dirname "$sheet")")")"
  mkdir -p "$dest/cells/$cell/series" && cp "$sheet" "$dest/cells/$cell/series/"
done
# the committed sheets as 256-colour PNGs (about half the bytes; emoji on white lose nothing visible)
"${PYTHON:-.venv/bin/python}" - "$dest" <<'PY'
import sys
from pathlib import Path
from PIL import Image
for path in Path(sys.argv[1]).glob("cells/*/series/contact_sheet.png"):
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
PY
if [ "$dest" = "docs/bench" ]; then
  cp "$run"/report.json src/consistent_diffusion/assets/bench/report.json
fi
echo "published $(ls "$dest"/cells | wc -l) cells to $dest"
