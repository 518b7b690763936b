#!/usr/bin/env bash
# One-time setup on a fresh machine: the external tools the tests use, and a
# virtual environment with vma_async installed (editable) plus its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in zstd gzip lzop pigz bzip2; do  # the decompression tests use them all (pzstd comes with zstd)
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# NBD peers no one here wrote (NBD tests) and QEMU's block layer (disk formats), issue 9
# borg: the deduplicating store of benchmarks/bench_dedup.py (issue 11)
for pair in qemu-nbd:qemu-utils qemu-img:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin \
    borg:borgbackup; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: please install: ${missing[*]} (tests use them)" >&2
        exit 1
    fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "neither a file nor a directory" || true
.venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "neither a file nor a directory" || true
.venv/bin/python -c "import vma_async, dissect.archive, trio, uvloop, zstandard" \
    || { echo "setup: installation failed" >&2; exit 1; }
