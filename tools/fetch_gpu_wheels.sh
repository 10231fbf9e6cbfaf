#!/usr/bin/env bash
# Download into .whl/ (repository root) the wheels that tools/gpu_check.sh installs on a GPU machine that
# reaches no package registry: the packages such a machine lacks, at the versions pyproject.toml pins, and
# their own dependencies that it lacks too. Run it where pip reaches PyPI; .whl/ is ignored by git.
#
#   tools/fetch_gpu_wheels.sh              # Python 3.12, x86-64 manylinux (the lent GPU machines)
#   PY_VERSION=3.11 tools/fetch_gpu_wheels.sh
#
# The GPU machine already has torch, timm, peft, numpy, scipy, pandas, tabulate, matplotlib, pillow, pyyaml,
# packaging, rich, cloudpickle, typing-extensions, opencv-python-headless and psutil. mmengine and mmcv-lite
# ask for opencv-python; the headless build provides the same cv2, and --no-deps installs skip the name.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
DEST=.whl

pin() {  # the version pyproject.toml pins for a dependency (name==version), else nothing
    sed -n "s/^ *\"$1==\([^\"]*\)\",*$/\1/p" pyproject.toml | head -n 1
}

# the harness's own dependencies the machine lacks (pinned where pyproject.toml pins them) ...
WANTED=("mmengine==$(pin mmengine)" "mmcv-lite==$(pin mmcv-lite)" "mmsegmentation==$(pin mmsegmentation)" submitit)
# ... and theirs: mmengine (addict, termcolor, yapf), yapf (platformdirs), mmsegmentation (prettytable),
# prettytable (wcwidth)
WANTED+=(addict termcolor yapf platformdirs prettytable wcwidth)
for w in "${WANTED[@]}"; do
    case $w in *==) echo "fetch_gpu_wheels: no pin for ${w%==} in pyproject.toml" >&2; exit 2 ;; esac
done

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WANTED[@]}"

# one version of each, or the install there stops
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
    echo "fetch_gpu_wheels: more than one wheel of: $dups" >&2
    exit 1
fi
du -sh "$DEST"
ls -1 "$DEST"
