#!/usr/bin/env bash
# The ELPV solar-cell set (PyPI elpv-dataset 1.0.0.post1, CC BY-NC-SA 4.0, non-commercial: fetched
# into the cache, never committed): 2,624 300x300 greyscale electroluminescence images of
# mono- and polycrystalline cells, each labelled with a defect probability 0, 1/3, 2/3 or 1.
# Writes, next to its labels.csv, the fixed split used for the transfer-learning results:
# every 4th image (in the set's own order) is test, the rest train (25 % held out, as the
# dataset paper's evaluation does):
#   elpv4_{train,test}.csv  path,label with label the defect probability (4 classes)
#   elpv2_{train,test}.csv  path,label with label defective (probability >= 0.5) or functional
# Prints the data directory.
set -euo pipefail
pkg=$(bash "$(dirname "$0")/fetch_pypi.sh" elpv-dataset 1.0.0.post1 85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c)
data="$pkg/elpv_dataset/data"
if [ ! -f "$data/elpv2_test.csv" ]; then
  for split in train test; do
    want=$([ $split = test ] && echo 0 || echo 1)
    awk -v want=$want 'BEGIN { print "path,label" } { keep = (NR % 4 != 0); if (keep == want) printf "%s,%.3f\n", $1, $2 }' "$data/labels.csv" > "$data/elpv4_$split.csv.partial"
    awk -v want=$want 'BEGIN { print "path,label" } { keep = (NR % 4 != 0); if (keep == want) printf "%s,%s\n", $1, ($2 >= 0.5 ? "defective" : "functional") }' "$data/labels.csv" > "$data/elpv2_$split.csv.partial"
  done
  for f in "$data"/elpv?_*.csv.partial; do mv "$f" "${f%.partial}"; done
fi
echo "$data"
