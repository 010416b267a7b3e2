#!/usr/bin/env bash
# benchmarks/make_bundle.sh NAME X45_RUN [ALL_RUN]: a copy of the shipped weights with planes-x4/x5 (and planes.safetensors) replaced
set -euo pipefail
name=$1; x45=$2; all=${3:-}
rm -rf runs/$name && mkdir -p runs/$name && cp src/thinslice/weights/* runs/$name/
cp $x45/final/planes.safetensors runs/$name/planes-x4.safetensors
cp $x45/final/planes.safetensors runs/$name/planes-x5.safetensors
if [ -n "$all" ]; then cp $all/final/planes.safetensors runs/$name/planes.safetensors; fi
ls -la runs/$name
