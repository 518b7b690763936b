#!/usr/bin/env bash
# Cross-check vma_async against the Proxmox reference `vma` tool.
#
# Usage: VMA_REFERENCE=/path/to/reference/vma scripts/crosscheck_reference.sh
#
# Optional: VMA_OURS (default: .venv/bin/vma of this checkout), PYTHON (default:
# .venv/bin/python), KEEP_WORKDIR=1 to keep the scratch directory for inspection,
# VMA_REFERENCE_CURRENT=/path/to/current/vma (today's Proxmox tool) to add section 3g:
# skip=, extract -d and create -d compared with it.
# Prints one PASS/FAIL line per check (INFO lines record reference behaviour that
# is not a pass/fail matter) and exits 1 when any check failed.
# How to build the reference binary: docs/compatibility.md.
set -u

here=$(cd "$(dirname "$0")/.." && pwd)
REF=${VMA_REFERENCE:?set VMA_REFERENCE to the reference vma binary}
OURS=${VMA_OURS:-$here/.venv/bin/vma}
PY=${PYTHON:-$here/.venv/bin/python}
for tool in "$REF" "$OURS" "$PY"; do
    [ -x "$tool" ] || { echo "not executable: $tool" >&2; exit 2; }
done
command -v zstd >/dev/null || { echo "zstd is needed (exec:zstd check)" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vma-crosscheck.XXXXXX")
if [ "${KEEP_WORKDIR:-0}" = 1 ]; then
    echo "workdir: $work"
else
    trap 'rm -rf "$work"' EXIT
fi
cd "$work" || exit 2

failures=0
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; failures=$((failures + 1)); }
info() { echo "INFO  $*"; }
verdict() { # verdict NAME CONDITION-EXIT-STATUS [detail]
    if [ "$2" -eq 0 ]; then pass "$1"; else fail "$1${3:+ -- $3}"; fi
}

# run TAG CMD...: stdout -> TAG.out, stderr -> TAG.err, exit status -> TAG.rc.
# The reference aborts on every error (SIGTRAP, 133); the braces keep the
# shell's "Trace/breakpoint trap" notice out of the report.
run() {
    local tag=$1
    shift
    { "$@" >"$tag.out" 2>"$tag.err"; echo $? >"$tag.rc"; } 2>/dev/null
}
rc() { cat "$1.rc"; }
# same A B: the files are equal but for the number in "duration N sec" (whole seconds
# since the start, as the reference counts them: two runs at different times may cross
# a second boundary at different points).
same() { cmp -s <(sed -E 's/duration [0-9]+ sec/duration N sec/' "$1") \
    <(sed -E 's/duration [0-9]+ sec/duration N sec/' "$2"); }
# The error line, with our " (archive FILE)" suffix removed (the reference has none).
errline() { grep -v '^progress ' "$1.err" | tail -n 1 | sed -E 's/ \(archive [^)]*\)$//'; }

# restored_equal IMAGE RESTORED: RESTORED is IMAGE zero-padded to its own size.
restored_equal() {
    local size
    size=$(stat -c %s "$2")
    cp "$1" padded.tmp && truncate -s "$size" padded.tmp && cmp -s padded.tmp "$2"
    local status=$?
    rm -f padded.tmp
    return $status
}

# --- inputs --------------------------------------------------------------------------------
# Sizes: not multiples of 512/4096/65536 (ours only: the reference's create cannot read a
# partial last cluster, see INFO below), multiples of 64 KiB (both), more than 58 clusters
# (several extents), all-zero, all-random and mixed content.
"$PY" - <<'EOF'
import random

rng = random.Random(20240601)


def image(name: str, size: int, kind: str) -> None:
    data = bytearray(size)
    if kind == "random":
        data[:] = rng.randbytes(size)
    elif kind == "mixed":  # whole random blocks, blocks with a few bytes set, zero blocks
        for offset in range(0, size, 4096):
            choice = rng.randrange(4)
            if choice == 0:
                data[offset : offset + 4096] = rng.randbytes(len(data[offset : offset + 4096]))
            elif choice == 1:
                data[offset + 100 : offset + 104] = b"\x01\x02\x03\x04"[: max(0, size - offset - 100)]
    with open(name, "wb") as f:
        f.write(data)


image("odd-mixed.raw", 3 * 65536 + 3 * 4096 + 1000, "mixed")
image("sector-random.raw", 1024 * 1024 + 512, "random")
image("odd-zero.raw", 200000, "zero")
image("big-mixed.raw", 5 * 1024 * 1024 + 7 * 4096, "mixed")
image("tiny-random.raw", 777, "random")
image("c3-mixed.raw", 3 * 65536, "mixed")
image("c70-mixed.raw", 70 * 65536, "mixed")
image("c2-zero.raw", 2 * 65536, "zero")
image("c1-random.raw", 65536, "random")
image("c130-mixed.raw", 130 * 65536, "mixed")
EOF
printf 'name: crosscheck\nmemory: 512\ncores: 2\n' >qemu-server.conf
printf '[OPTIONS]\nenable: 1\n' >qemu-server.fw

ODD_DEVICES=(odd-mixed.raw sector-random.raw odd-zero.raw drive-scsi0=big-mixed.raw tiny-random.raw)
ODD_NAMES=(disk0 disk1 disk2 drive-scsi0 disk4)
ODD_FILES=(odd-mixed.raw sector-random.raw odd-zero.raw big-mixed.raw tiny-random.raw)
ALIGNED_DEVICES=(c3-mixed.raw drive-virtio1=c70-mixed.raw c2-zero.raw c1-random.raw)
ALIGNED_NAMES=(disk0 drive-virtio1 disk2 disk3)
ALIGNED_FILES=(c3-mixed.raw c70-mixed.raw c2-zero.raw c1-random.raw)

# --- 3a: archives made by our create, read by the reference --------------------------------
echo "== 3a: our archives, reference reader"
run a-create "$OURS" create ours.vma -c qemu-server.conf -c "$work/qemu-server.fw" "${ODD_DEVICES[@]}"
verdict "3a ours: create 5 devices (odd sizes) + 2 configs" "$(rc a-create)" "$(errline a-create)"
run a-verify "$REF" verify -v ours.vma
verdict "3a reference: verify -v ours.vma" "$(rc a-verify)" "$(errline a-verify)"
run a-list-ref "$REF" list ours.vma
run a-list-ours "$OURS" list ours.vma
cmp -s a-list-ref.out a-list-ours.out
verdict "3a list of ours.vma: ours == reference (stdout)" $?
run a-verify-ours "$OURS" verify -v ours.vma
same a-verify.out a-verify-ours.out && same a-verify.err a-verify-ours.err
verdict "3a verify -v of ours.vma: ours == reference (stdout, stderr)" $?
run a-extract "$REF" extract -v ours.vma ref-x
verdict "3a reference: extract -v ours.vma" "$(rc a-extract)" "$(errline a-extract)"
for i in "${!ODD_NAMES[@]}"; do
    restored_equal "${ODD_FILES[$i]}" "ref-x/disk-${ODD_NAMES[$i]}.raw"
    verdict "3a reference restore of ${ODD_NAMES[$i]} (${ODD_FILES[$i]}, $(stat -c %s "${ODD_FILES[$i]}") B) == image" $?
done
cmp -s ref-x/qemu-server.conf qemu-server.conf && cmp -s ref-x/qemu-server.fw qemu-server.fw
verdict "3a reference restore of both configs == inputs" $?

run a-zstd "$OURS" create 'exec:zstd -q -o ours.vma.zst' -c qemu-server.conf "${ODD_DEVICES[@]}"
verdict "3a ours: create exec:zstd" "$(rc a-zstd)" "$(errline a-zstd)"
zstd -dq ours.vma.zst -o ours-zstd.vma
run a-zverify "$REF" verify ours-zstd.vma
verdict "3a reference: verify decompressed exec:zstd archive" "$(rc a-zverify)" "$(errline a-zverify)"
run a-zextract "$REF" extract ours-zstd.vma ref-zx
ok=$(rc a-zextract)
for i in "${!ODD_NAMES[@]}"; do
    restored_equal "${ODD_FILES[$i]}" "ref-zx/disk-${ODD_NAMES[$i]}.raw" || ok=1
done
verdict "3a reference: extract decompressed exec:zstd archive, every device == image" "$ok"
run a-stdin sh -c "zstd -dc ours.vma.zst | '$REF' extract - ref-sx"
ok=$(rc a-stdin)
for i in "${!ODD_NAMES[@]}"; do
    restored_equal "${ODD_FILES[$i]}" "ref-sx/disk-${ODD_NAMES[$i]}.raw" || ok=1
done
verdict "3a reference: extract - (zstd -dc pipe), every device == image" "$ok"
for method in zstd gzip; do  # in-process compression (vma create --compress)
    run "a-c$method" "$OURS" create --compress "$method" "ours-c.vma.$method" \
        -c qemu-server.conf "${ODD_DEVICES[@]}"
    verdict "3a ours: create --compress $method" "$(rc "a-c$method")" "$(errline "a-c$method")"
    if [ "$method" = zstd ]; then unpack="zstd -dc"; else unpack="gzip -dc"; fi
    run "a-c$method-x" sh -c "$unpack ours-c.vma.$method | '$REF' extract - ref-c$method"
    ok=$(rc "a-c$method-x")
    for i in "${!ODD_NAMES[@]}"; do
        restored_equal "${ODD_FILES[$i]}" "ref-c$method/disk-${ODD_NAMES[$i]}.raw" || ok=1
    done
    verdict "3a reference: extract - of our --compress $method archive, every device == image" "$ok"
done

# --- 3b: archives made by the reference's create, read by ours -------------------------------
echo "== 3b: reference archives, our reader"
run b-partial "$REF" create partial.vma odd-mixed.raw
info "reference create of odd-mixed.raw ($(stat -c %s odd-mixed.raw) B, not a multiple of 64 KiB): exit $(rc b-partial), '$(paste -sd '|' b-partial.err)'"
run b-create "$REF" create ref.vma -c qemu-server.conf -c "$work/qemu-server.fw" "${ALIGNED_DEVICES[@]}"
verdict "3b reference: create 4 devices (64 KiB multiples) + 2 configs" "$(rc b-create)" "$(errline b-create)"
for cmd in list "verify -v" "config" "config -c qemu-server.fw"; do
    tag=b-$(echo "$cmd" | tr -c 'a-z\n' '_')
    # shellcheck disable=SC2086  # $cmd is a command plus its options
    run "$tag-ref" "$REF" $cmd ref.vma
    # shellcheck disable=SC2086
    run "$tag-ours" "$OURS" $cmd ref.vma
    same "$tag-ref.out" "$tag-ours.out" && same "$tag-ref.err" "$tag-ours.err" \
        && [ "$(rc "$tag-ref")" = "$(rc "$tag-ours")" ]
    verdict "3b '$cmd ref.vma': ours == reference (stdout, stderr, exit status)" $? \
        "$(diff "$tag-ref.out" "$tag-ours.out" | head -n 4 | tr '\n' ' ')"
done
for verbose in "" "-v"; do
    run "b-x$verbose-ref" "$REF" extract $verbose ref.vma "x$verbose-ref"
    run "b-x$verbose-ours" "$OURS" extract $verbose ref.vma "x$verbose-ours"
    # The target directory is part of each line: compare with it replaced.
    # (and "duration N sec" as in same()).
    diff -q <(sed -E "s#x$verbose-ref/#DIR/#; s/duration [0-9]+ sec/duration N sec/" "b-x$verbose-ref.out") \
        <(sed -E "s#x$verbose-ours/#DIR/#; s/duration [0-9]+ sec/duration N sec/" "b-x$verbose-ours.out") >/dev/null \
        && cmp -s "b-x$verbose-ref.err" "b-x$verbose-ours.err" \
        && [ "$(rc "b-x$verbose-ref")" = 0 ] && [ "$(rc "b-x$verbose-ours")" = 0 ]
    verdict "3b 'extract${verbose:+ $verbose} ref.vma': ours == reference (output lines, exit status)" $?
    diff -r "x$verbose-ref" "x$verbose-ours" >/dev/null
    verdict "3b 'extract${verbose:+ $verbose}': our restored tree == reference's (every file)" $?
done
ok=0
for i in "${!ALIGNED_NAMES[@]}"; do
    cmp -s "${ALIGNED_FILES[$i]}" "x-ours/disk-${ALIGNED_NAMES[$i]}.raw" || ok=1
done
verdict "3b our restore of every device == its image" $ok

# extract -r MAP into existing files prefilled with 0xAA (one 64 KiB larger than its device):
# '0:' leaves zero blocks unwritten, '1:' writes them; option prefixes as PVE sends them.
for who in ref ours; do
    "$PY" - "$who" <<'EOF'
import sys

for index, size in enumerate((196608, 4587520 + 65536, 131072, 65536)):
    with open(f"map-{sys.argv[1]}-{index}.raw", "wb") as f:
        f.write(b"\xaa" * size)
EOF
    {
        echo "format=raw:0:disk0=$work/map-$who-0.raw"
        echo "cache=none:1:drive-virtio1=$work/map-$who-1.raw"
        echo "throttling.bps=100000000:throttling.group=g1:1:disk2=$work/map-$who-2.raw"
        echo "0:disk3=$work/map-$who-3.raw"
        echo "done"
    } >"map-$who.txt"
done
run b-map-ref "$REF" extract -r map-ref.txt ref.vma map-ref-dir
run b-map-ours "$OURS" extract -r map-ours.txt ref.vma map-ours-dir
ok=0
[ "$(rc b-map-ref)" = 0 ] && [ "$(rc b-map-ours)" = 0 ] || ok=1
diff -q <(sed 's#map-ref#MAP#g' b-map-ref.out) <(sed 's#map-ours#MAP#g' b-map-ours.out) >/dev/null || ok=1
for index in 0 1 2 3; do cmp -s "map-ref-$index.raw" "map-ours-$index.raw" || ok=1; done
verdict "3b 'extract -r MAP' into existing files (0:/1: zeros, option prefixes): stdout, exit status and every target == reference's" $ok

# --- 3c: byte identity ---------------------------------------------------------------------
echo "== 3c: byte identity"
cat >identity.py <<'EOF'
"""Compare two archives extent by extent, then re-encode the reference's with vma_async.

argv: MODE REFERENCE OURS NEW [DEVNAME=IMAGE ...]
MODE create_archive: the one-call layer (what our `vma create` uses);
MODE replay: the low-level VmaWriter fed clusters in the reference archive's order.
NEW gets the reference's uuid and ctime; the caller compares it with REFERENCE (cmp).
"""

import sys

import anyio

from vma_async import CLUSTER_SIZE, EXTENT_HEADER_SIZE, VmaReader, VmaWriter, create_archive


async def layout(path):
    async with await VmaReader.open(path) as reader:
        extents = []
        with open(path, "rb") as raw:
            async for extent in reader.extents():
                raw.seek(extent.offset + EXTENT_HEADER_SIZE)
                entries = [(e.dev_id, e.cluster_num, e.mask) for e in extent.header.entries]
                extents.append((entries, raw.read(extent.header.data_size)))
        return reader.header, extents


async def replay(header, extents, images, target):
    files = {dev.dev_id: open(images[dev.name], "rb") for dev in header.devices}
    writer = await VmaWriter.open(target, uuid=header.uuid, ctime=header.ctime)
    try:
        for name, data in header.configs:
            writer.add_config(name, data)
        for dev in header.devices:
            if writer.register_stream(dev.name, dev.size) != dev.dev_id:
                raise SystemExit("dev_id assignment differs from the reference")
        for entries, _ in extents:
            for dev_id, cluster_num, _mask in entries:
                files[dev_id].seek(cluster_num * CLUSTER_SIZE)
                await writer.write(dev_id, cluster_num, files[dev_id].read(CLUSTER_SIZE))
        for dev in header.devices:
            await writer.close_stream(dev.dev_id)
        await writer.aclose()
    except BaseException as exc:
        await writer.abort(exc)
        raise


async def main():
    mode, reference, ours, new = sys.argv[1:5]
    images = dict(arg.split("=", 1) for arg in sys.argv[5:])
    ref_header, ref_extents = await layout(reference)
    _, our_extents = await layout(ours)
    same_info = [e for e, _ in ref_extents] == [e for e, _ in our_extents]
    same_data = [d for _, d in ref_extents] == [d for _, d in our_extents]
    print(
        f"extents: reference {len(ref_extents)}, ours {len(our_extents)}; "
        f"blockinfo {'equal' if same_info else 'DIFFERENT'}; data {'equal' if same_data else 'DIFFERENT'}"
    )
    if mode == "create_archive":
        await create_archive(
            new,
            [(dev.name, images[dev.name]) for dev in ref_header.devices],
            configs=ref_header.configs,
            size_multiple=512,
            uuid=ref_header.uuid,
            ctime=ref_header.ctime,
        )
    else:
        await replay(ref_header, ref_extents, images, new)
    sys.exit(0 if same_info and same_data else 1)


anyio.run(main)
EOF
run c-ref "$REF" create single-ref.vma -c qemu-server.conf c130-mixed.raw
run c-ours "$OURS" create single-ours.vma -c qemu-server.conf c130-mixed.raw
[ "$(rc c-ref)" = 0 ] && [ "$(rc c-ours)" = 0 ]
verdict "3c both tools: create single-device archive (130 clusters, 3 extents)" $?
run c-decode "$PY" identity.py create_archive single-ref.vma single-ours.vma single-new.vma disk0=c130-mixed.raw
verdict "3c decoded extents (blockinfo sequence, data bytes): ours == reference [$(cat c-decode.out)]" "$(rc c-decode)" "$(tail -n 1 c-decode.err)"
cmp single-ref.vma single-new.vma >c-cmp.out 2>&1
verdict "3c cmp: create_archive with the reference's uuid+ctime == reference archive, byte for byte ($(stat -c %s single-ref.vma) B)" $? "$(cat c-cmp.out)"
run c-replay "$PY" identity.py replay ref.vma ref.vma multi-new.vma \
    disk0=c3-mixed.raw drive-virtio1=c70-mixed.raw disk2=c2-zero.raw disk3=c1-random.raw
[ "$(rc c-replay)" = 0 ] && cmp ref.vma multi-new.vma >c-cmp2.out 2>&1
verdict "3c cmp: VmaWriter replaying the 4-device reference archive's cluster order == reference archive" $? \
    "$(tail -n 1 c-replay.err) $(cat c-cmp2.out 2>/dev/null)"
run c-empty-ref "$REF" create empty-ref.vma -c "$work/qemu-server.conf" -c "$work/qemu-server.fw"
"$PY" - <<'EOF' >c-empty.out 2>&1
import anyio

from vma_async import VmaReader, create_archive


async def main() -> None:
    async with await VmaReader.open("empty-ref.vma") as reader:
        header = reader.header
    await create_archive("empty-new.vma", [], configs=header.configs, uuid=header.uuid, ctime=header.ctime)


anyio.run(main)
EOF
[ "$(rc c-empty-ref)" = 0 ] && cmp empty-ref.vma empty-new.vma >>c-empty.out 2>&1
verdict "3c cmp: configs-only archive (no devices) with the reference's uuid+ctime == reference archive" $? "$(tail -n 1 c-empty.out)"

# --- 3d: errors ----------------------------------------------------------------------------
echo "== 3d: errors (messages compared without our ' (archive FILE)' suffix)"
# Mid-extent truncation: the reference's reader notices a short extent.
head -c 1000000 single-ref.vma >short.vma
# Truncation at an extent boundary: only the missing-cluster check notices.
second_extent=$("$PY" -c '
import sys, anyio
from vma_async import VmaReader
async def main():
    async with await VmaReader.open(sys.argv[1]) as reader:
        print([e.offset async for e in reader.extents()][1])
anyio.run(main)' single-ref.vma)
head -c "$second_extent" single-ref.vma >cut.vma
{ printf 'XMA\0'; tail -c +5 single-ref.vma; } >magic.vma

# same_error TITLE ARGS...: both fail with the same message (exit status: ref 133, ours 1).
same_error() {
    local title=$1
    shift
    local dir_args=("$@")
    run d-ref "$REF" "${dir_args[@]/@DIR@/d-ref-dir}"
    run d-ours "$OURS" "${dir_args[@]/@DIR@/d-ours-dir}"
    local r o
    r=$(errline d-ref)
    o=$(errline d-ours)
    local status=0
    [ "$(rc d-ref)" != 0 ] && [ "$(rc d-ours)" != 0 ] && [ "$r" = "$o" ] || status=1
    # status is taken before the title's $(rc ...) calls, which reset $?.
    verdict "3d $title: '$r' (exit ref $(rc d-ref), ours $(rc d-ours))" "$status" "ours: '$o'"
    rm -rf d-ref-dir d-ours-dir
}
same_error "verify of a mid-extent truncation" verify short.vma
same_error "verify -v of a mid-extent truncation" verify -v short.vma
same_error "extract of a mid-extent truncation" extract short.vma @DIR@
same_error "extract of an extent-boundary truncation" extract cut.vma @DIR@
same_error "list of a wrong magic" list magic.vma
same_error "verify of a wrong magic" verify magic.vma
same_error "extract of a wrong magic" extract magic.vma @DIR@
same_error "config with a missing config name" config single-ref.vma -c no-such.conf

# Documented deviations (docs/cli.md): the reference's verify misses a truncation at an
# extent boundary; ours reports it. The reference leaves tmp-disk-*.raw behind; ours nothing.
run d-cut-ref "$REF" verify cut.vma
run d-cut-ours "$OURS" verify cut.vma
info "verify of an extent-boundary truncation: reference exit $(rc d-cut-ref) (accepts it); ours exit $(rc d-cut-ours), '$(errline d-cut-ours)'"
[ "$(rc d-cut-ours)" != 0 ] && [ "$(errline d-cut-ours)" = "vma: verify failed - detected missing cluster 58 for stream disk0" ]
verdict "3d ours: verify of an extent-boundary truncation reports the missing cluster" $?
run d-left-ref "$REF" extract short.vma left-ref
run d-left-ours "$OURS" extract short.vma left-ours
info "failed extract leaves: reference [$(find left-ref -mindepth 1 -printf '%f ' 2>/dev/null)]; ours [$(find left-ours -mindepth 1 -printf '%f ' 2>/dev/null)]"
[ ! -e left-ours ]
verdict "3d ours: a failed extract leaves nothing behind" $?

# --- 3e: disk formats through QEMU (qcow2, vmdk, vdi) -----------------------------------------
# Our create reads an image's virtual disk through qemu-nbd (never the container file), in both
# syntaxes; the reference's extract restores it. Maps with format=qcow2 write through qemu-nbd.
echo "== 3e: disk formats"
if command -v qemu-img >/dev/null && command -v qemu-nbd >/dev/null; then
    for fmt in qcow2 vmdk vdi; do
        qemu-img convert -q -f raw -O "$fmt" c70-mixed.raw "src.$fmt"
        qemu-img convert -q -f raw -O "$fmt" sector-random.raw "odd.$fmt"
        run "e-$fmt-d" "$OURS" create "e-$fmt-d.vma" -d "format=$fmt:drive-scsi0=src.$fmt" \
            -d "format=$fmt:drive-scsi1=odd.$fmt" -d format=raw:drive-scsi2=c3-mixed.raw
        run "e-$fmt-p" "$OURS" create "e-$fmt-p.vma" "drive-scsi0=src.$fmt" "drive-scsi1=odd.$fmt" \
            drive-scsi2=c3-mixed.raw
        for syntax in d p; do
            tag=e-$fmt-$syntax
            run "$tag-x" "$REF" extract "$tag.vma" "$tag-x"
            ok=$(rc "$tag")
            [ "$(rc "$tag-x")" = 0 ] || ok=1
            restored_equal c70-mixed.raw "$tag-x/disk-drive-scsi0.raw" || ok=1
            restored_equal sector-random.raw "$tag-x/disk-drive-scsi1.raw" || ok=1
            cmp -s c3-mixed.raw "$tag-x/disk-drive-scsi2.raw" || ok=1
            what=$([ $syntax = d ] && echo "-d format=$fmt:NAME=PATH" || echo "positional (probed)")
            verdict "3e ours: create from $fmt, $what; reference extract: every virtual disk == image" \
                "$ok" "$(errline "$tag") $(errline "$tag-x")"
        done
        run "e-$fmt-ref" "$REF" create "e-$fmt-ref.vma" "src.$fmt"
        if [ "$(rc "e-$fmt-ref")" = 0 ]; then
            run "e-$fmt-ref-x" "$OURS" extract "e-$fmt-ref.vma" "e-$fmt-ref-x"
            ok=$(rc "e-$fmt-ref-x")
            cmp -s c70-mixed.raw "e-$fmt-ref-x/disk-disk0.raw" || ok=1
            verdict "3e reference: create from $fmt (probed); ours: extract == virtual disk" "$ok"
        else  # the 7.2 reference cannot read vdi images ("vma_writer_close failed read error")
            info "reference create from $fmt: exit $(rc "e-$fmt-ref"), '$(paste -sd '|' "e-$fmt-ref.err")'"
        fi
        run "e-$fmt-fx" "$OURS" extract --format "$fmt" "e-$fmt-d.vma" "e-$fmt-fx"
        ok=$(rc "e-$fmt-fx")
        qemu-img convert -q -f "$fmt" -O raw "e-$fmt-fx/disk-drive-scsi0.$fmt" "e-$fmt-fx.raw" || ok=1
        cmp -s c70-mixed.raw "e-$fmt-fx.raw" || ok=1
        verdict "3e ours: extract --format $fmt; image converts back to the disk" "$ok" "$(errline "e-$fmt-fx")"
    done
    # extract -r with format=qcow2 and format=vmdk targets prefilled with 0xAA, '1:' (zeros written):
    # the reference's targets and ours hold the same virtual disks afterwards.
    "$PY" -c 'open("aa-big.raw", "wb").write(b"\xaa" * 4587520)
open("aa-small.raw", "wb").write(b"\xaa" * 196608)'
    for who in ref ours; do
        qemu-img convert -q -f raw -O qcow2 aa-big.raw "emap-$who-0.qcow2"
        qemu-img convert -q -f raw -O vmdk aa-small.raw "emap-$who-1.vmdk"
        cp aa-big.raw "emap-$who-2.raw" && truncate -s 1049088 "emap-$who-2.raw"
        {
            echo "throttling.bps=100000000:throttling.group=local:format=qcow2:1:drive-scsi0=$work/emap-$who-0.qcow2"
            echo "format=vmdk:cache=writeback:0:drive-scsi2=$work/emap-$who-1.vmdk"
            echo "format=raw:1:drive-scsi1=$work/emap-$who-2.raw"
            echo "done"
        } >"emap-$who.txt"
    done
    run e-map-ref "$REF" extract -r emap-ref.txt e-qcow2-p.vma emap-ref-dir
    run e-map-ours "$OURS" extract -r emap-ours.txt e-qcow2-p.vma emap-ours-dir
    ok=0
    [ "$(rc e-map-ref)" = 0 ] && [ "$(rc e-map-ours)" = 0 ] || ok=1
    for pair in 0.qcow2:qcow2 1.vmdk:vmdk; do
        file=${pair%%:*} fmt=${pair##*:}
        qemu-img convert -q -f "$fmt" -O raw "emap-ref-$file" "emap-ref-$file.raw" || ok=1
        qemu-img convert -q -f "$fmt" -O raw "emap-ours-$file" "emap-ours-$file.raw" || ok=1
        cmp -s "emap-ref-$file.raw" "emap-ours-$file.raw" || ok=1
    done
    cmp -s emap-ref-2.raw emap-ours-2.raw || ok=1
    cmp -s <(head -c 4587520 emap-ours-0.qcow2.raw) c70-mixed.raw || ok=1
    verdict "3e 'extract -r' with format=qcow2/vmdk/raw targets (0:/1:, throttle, cache): every virtual disk == reference's" \
        "$ok" "$(errline e-map-ref) $(errline e-map-ours)"
else
    info "qemu-img/qemu-nbd missing (Debian package qemu-utils): disk format checks skipped"
fi

# --- 3f: canonical archives (create --reproducible, repack) and partial restore --------------
# A reproducible or repacked archive is an ordinary archive to the reference: it must verify
# and extract byte-exact. The same input must give the same bytes.
echo "== 3f: reproducible and repacked archives"
UUID_FIXED=0b5e55ed-0000-4000-8000-000000000100
run f-r1 "$OURS" create --reproducible r1.vma -c qemu-server.conf "${ODD_DEVICES[@]}"
run f-r2 "$OURS" create --reproducible r2.vma -c qemu-server.conf "${ODD_DEVICES[@]}"
[ "$(rc f-r1)" = 0 ] && [ "$(rc f-r2)" = 0 ] && cmp -s r1.vma r2.vma
verdict "3f ours: create --reproducible twice (5 devices): byte-identical archives" $? "$(errline f-r1)"
# check_ref_extract TAG ARCHIVE NAMES-ARRAY FILES-ARRAY: reference verify + extract, every disk == image.
check_ref_extract() {
    local tag=$1 archive=$2
    local -n names=$3 files=$4
    run "$tag-v" "$REF" verify -v "$archive"
    run "$tag-x" "$REF" extract "$archive" "$tag-x"
    local ok=0
    [ "$(rc "$tag-v")" = 0 ] && [ "$(rc "$tag-x")" = 0 ] || ok=1
    for i in "${!names[@]}"; do
        restored_equal "${files[$i]}" "$tag-x/disk-${names[$i]}.raw" || ok=1
    done
    cmp -s "$tag-x/qemu-server.conf" qemu-server.conf || ok=1
    verdict "3f reference: verify + extract $archive, every disk == image, config kept" "$ok" \
        "$(errline "$tag-v") $(errline "$tag-x")"
}
check_ref_extract f-r1 r1.vma ODD_NAMES ODD_FILES
run f-p1 "$OURS" repack ours.vma ours-repacked.vma --uuid "$UUID_FIXED"
verdict "3f ours: repack ours.vma (interleaved, 5 devices, 2 configs) --uuid" "$(rc f-p1)" "$(errline f-p1)"
check_ref_extract f-p1 ours-repacked.vma ODD_NAMES ODD_FILES
cmp -s f-p1-x/qemu-server.fw qemu-server.fw
verdict "3f reference: the repacked archive keeps both configs" $?
run f-p2 "$OURS" repack ref.vma ref-repacked.vma
run f-p2-x "$REF" extract ref-repacked.vma ref-repacked-x
[ "$(rc f-p2)" = 0 ] && [ "$(rc f-p2-x)" = 0 ] && diff -r x-ref ref-repacked-x >/dev/null
verdict "3f repack of the reference's own archive: reference extract == extract of the original (every file)" $? \
    "$(errline f-p2) $(errline f-p2-x)"
run f-l1 "$REF" list ref.vma
run f-l2 "$REF" list ref-repacked.vma
cmp -s f-l1.out f-l2.out
verdict "3f repack keeps configs, devices, sizes and ctime (reference list output equal)" $?
# The reproducible archive == repack of a default create given the same uuid and ctime.
run f-d "$OURS" create default.vma -c qemu-server.conf "${ODD_DEVICES[@]}"
read -r r1_uuid r1_ctime < <("$OURS" list --json r1.vma | "$PY" -c '
import json, sys
d = json.load(sys.stdin)
print(d["uuid"], d["ctime_epoch"])')
run f-p3 "$OURS" repack default.vma default-repacked.vma --uuid "$r1_uuid" --ctime "$r1_ctime"
[ "$(rc f-d)" = 0 ] && [ "$(rc f-p3)" = 0 ] && cmp -s r1.vma default-repacked.vma
verdict "3f ours: repack of a default (interleaved) create == create --reproducible, byte for byte" $?
run f-help "$REF" extract -d x ref.vma f-help-x
if [ "$(rc f-help)" = 0 ]; then
    info "the reference supports extract -d: partial restore could be compared here"
else
    info "the reference built here predates 'extract -d' and 'skip=' (pve-qemu 2022+): partial restore is covered by tests/test_partial_restore.py only"
fi

# --- 3g: current Proxmox vma (optional): skip=, extract -d, create -d ----------------------------
# VMA_REFERENCE_CURRENT=/path/to/vma built from today's pve-qemu patch (docs/compatibility.md,
# "The current tool"). Compares our partial restore and create -d with it, output and bytes.
if [ -n "${VMA_REFERENCE_CURRENT:-}" ]; then
    CUR=$VMA_REFERENCE_CURRENT
    echo "== 3g: current reference ($CUR): skip=, extract -d, create -d"
    # both_run TAG ARGS...: run the current reference and ours; @W@ in an argument becomes
    # cur or ours (target directories, maps). Results in TAG-cur.* and TAG-ours.*.
    both_run() {
        local tag=$1
        shift
        run "$tag-cur" "$CUR" "${@//@W@/cur}"
        run "$tag-ours" "$OURS" "${@//@W@/ours}"
    }
    # same_output TAG: stdout without progress lines and with cur/ours replaced, stderr, and
    # exit status are equal.
    same_output() {
        diff -q <(grep -v '^progress ' "$1-cur.out" | sed 's/cur/W/g') \
            <(grep -v '^progress ' "$1-ours.out" | sed 's/ours/W/g') >/dev/null \
            && cmp -s "$1-cur.err" "$1-ours.err" && [ "$(rc "$1-cur")" = "$(rc "$1-ours")" ]
    }
    # same_failure TITLE TAG: both fail with the same message (exit status: cur 133, ours 1).
    same_failure() {
        local r o status
        r=$(errline "$2-cur")
        o=$(errline "$2-ours")
        [ "$(rc "$2-cur")" != 0 ] && [ "$(rc "$2-ours")" != 0 ] && [ -n "$r" ] && [ "$r" = "$o" ]
        status=$?  # before the title's command substitutions reset $?
        verdict "3g $1: '$r' (exit cur $(rc "$2-cur"), ours $(rc "$2-ours"))" $status "ours: '$o'"
    }
    # aa_targets WHO NAME:IMAGE...: target files of each image's size, filled with 0xAA.
    aa_targets() {
        local who=$1 pair
        shift
        for pair in "$@"; do
            "$PY" -c 'import os, sys; open(sys.argv[1], "wb").write(b"\xaa" * os.path.getsize(sys.argv[2]))' \
                "g-$who-${pair%%:*}.raw" "${pair##*:}"
        done
    }
    is_aa() { "$PY" -c 'import sys; d = open(sys.argv[1], "rb").read(); sys.exit(d.count(0xAA) != len(d))' "$1"; }

    # (c) first: the archive the other checks read is made by the current reference's create -d.
    both_run g-create create g-@W@.vma -c qemu-server.conf -d format=raw:drive-a=c3-mixed.raw \
        -d format=raw:drive-b=c70-mixed.raw -d format=raw:c1-random.raw
    ok=0
    same_output g-create || ok=1
    diff -q <("$CUR" list g-cur.vma | grep -v '^CTIME') <("$CUR" list g-ours.vma | grep -v '^CTIME') >/dev/null || ok=1
    for who in cur ours; do
        run "g-create-x-$who" "$CUR" extract "g-$who.vma" "g-create-x-$who"
        [ "$(rc "g-create-x-$who")" = 0 ] || ok=1
        cmp -s c3-mixed.raw "g-create-x-$who/disk-drive-a.raw" || ok=1
        cmp -s c70-mixed.raw "g-create-x-$who/disk-drive-b.raw" || ok=1
        cmp -s c1-random.raw "g-create-x-$who/disk-disk2.raw" || ok=1
    done
    verdict "3g 'create -d format=raw:NAME=PATH -d ... -d format=raw:PATH': output, list (but CTIME) and every disk (extracted by the reference) equal" $ok \
        "$(errline g-create-cur) $(errline g-create-ours)"
    both_run g-mix1 create g-mix1-@W@.vma -d format=raw:drive-a=c3-mixed.raw c1-random.raw
    same_failure "create: -d mixed with a positional device" g-mix1
    both_run g-mix2 create g-mix2-@W@.vma c1-random.raw -d format=raw:drive-a=c3-mixed.raw
    same_failure "create: a positional device mixed with -d" g-mix2
    both_run g-nofmt create g-nofmt-@W@.vma -d drive-a=c3-mixed.raw
    same_failure "create: -d without format=" g-nofmt
    both_run g-unterm create g-unterm-@W@.vma -d format=raw
    same_failure "create: -d format=raw (no ':')" g-unterm
    both_run g-unknown create g-unknown-@W@.vma -d format=qcow3:drive-a=c3-mixed.raw
    same_failure "create: -d with an unknown format" g-unknown
    ok=0
    for tag in g-mix1 g-mix2 g-nofmt g-unterm g-unknown; do [ -e "$tag-ours.vma" ] && ok=1; done
    verdict "3g ours: no archive file left by a bad create -d" $ok
    info "current reference leaves [$(ls g-*-cur.vma 2>/dev/null | grep -v '^g-cur.vma$' | tr '\n' ' ')] after bad create -d specs (docs/cli.md)"
    both_run g-pos create g-pos-@W@.vma drive-a=c3-mixed.raw c1-random.raw
    info "current reference, positional devices: exit $(rc g-pos-cur), stderr '$(paste -sd '|' g-pos-cur.err)'; ours: exit $(rc g-pos-ours), stderr '$(paste -sd '|' g-pos-ours.err)'"
    if command -v qemu-img >/dev/null && command -v qemu-nbd >/dev/null; then
        qemu-img convert -q -f raw -O qcow2 c70-mixed.raw g-src.qcow2
        both_run g-qcow2 create g-qcow2-@W@.vma -d format=qcow2:drive-q=g-src.qcow2 -d format=raw:drive-a=c3-mixed.raw
        ok=0
        same_output g-qcow2 || ok=1
        for who in cur ours; do
            run "g-qcow2-x-$who" "$CUR" extract "g-qcow2-$who.vma" "g-qcow2-x-$who"
            cmp -s c70-mixed.raw "g-qcow2-x-$who/disk-drive-q.raw" || ok=1
            cmp -s c3-mixed.raw "g-qcow2-x-$who/disk-drive-a.raw" || ok=1
        done
        verdict "3g 'create -d format=qcow2:...': both archives restore the virtual disk" $ok
    fi

    # (a) extract -d
    both_run g-d extract -v -d drive-a,disk2 g-cur.vma g-d-@W@
    ok=0
    same_output g-d || ok=1
    [ "$(ls g-d-cur | tr '\n' ' ')" = "$(ls g-d-ours | tr '\n' ' ')" ] || ok=1
    cmp -s c3-mixed.raw g-d-ours/disk-drive-a.raw && cmp -s c1-random.raw g-d-ours/disk-disk2.raw || ok=1
    cmp -s g-d-cur/disk-drive-a.raw g-d-ours/disk-drive-a.raw || ok=1
    verdict "3g 'extract -v -d drive-a,disk2': output (but progress), files [$(ls g-d-ours | tr '\n' ' ')] and bytes == reference's" $ok
    info "'extract -v -d': progress lines: reference $(grep -c '^progress' g-d-cur.out) (counts every disk's clusters), ours $(grep -c '^progress' g-d-ours.out) (the restored disks')"
    both_run g-d2 extract g-cur.vma g-d2-@W@ -d drive-a -d drive-b
    info "'extract -d drive-a -d drive-b': reference restores [$(ls g-d2-cur | tr '\n' ' ')] (the last list), ours [$(ls g-d2-ours | tr '\n' ' ')] (the lists add up)"
    both_run g-du extract -d drive-a,drive-x g-cur.vma g-du-@W@
    info "'extract -d drive-a,drive-x' (unknown name): reference exit $(rc g-du-cur), restores [$(ls g-du-cur 2>/dev/null | tr '\n' ' ')]"
    [ "$(rc g-du-ours)" = 1 ] && [ ! -e g-du-ours ] \
        && [ "$(errline g-du-ours)" = "vma: no disk named 'drive-x' in the archive (its disks: drive-a, drive-b, disk2)" ]
    verdict "3g ours: 'extract -d' with an unknown name fails naming the archive's disks, nothing created" $? "$(errline g-du-ours)"

    # (b) -r MAP with skip= lines (targets prefilled with 0xAA and written with zeros, 1:; the
    # skipped one must stay 0xAA)
    for who in cur ours; do
        aa_targets "$who" a:c3-mixed.raw b:c70-mixed.raw c:c1-random.raw
        printf 'format=raw:1:drive-a=%s\nskip=drive-b\n1:disk2=%s\ndone\n' \
            "$work/g-$who-a.raw" "$work/g-$who-c.raw" >"g-map-$who.txt"
        printf 'format=raw:1:drive-a=%s\nskip=drive-b\ndone\n' "$work/g-$who-a.raw" >"g-map2-$who.txt"
    done
    both_run g-skip extract -v -r g-map-@W@.txt g-cur.vma g-skip-@W@
    ok=0
    same_output g-skip || ok=1
    for t in a b c; do cmp -s "g-cur-$t.raw" "g-ours-$t.raw" || ok=1; done
    cmp -s c3-mixed.raw g-ours-a.raw && cmp -s c1-random.raw g-ours-c.raw && is_aa g-ours-b.raw || ok=1
    verdict "3g 'extract -v -r MAP' with skip=drive-b: output (but progress), exit status and every target == reference's (skipped one untouched)" $ok \
        "$(errline g-skip-cur) $(errline g-skip-ours)"
    both_run g-nomap extract -r g-map2-@W@.txt g-cur.vma g-nomap-@W@
    same_failure "'extract -r' with a disk that has neither a map line nor skip=" g-nomap
    printf 'skip=\ndone\n' >g-map3.txt
    both_run g-skipempty extract -r g-map3.txt g-cur.vma g-skipempty-@W@
    same_failure "'extract -r' with 'skip=' and no name" g-skipempty
    for who in cur ours; do aa_targets "$who" a:c3-mixed.raw; done
    both_run g-dmap extract -d drive-a -r g-map2-@W@.txt g-cur.vma g-dmap-@W@
    ok=0
    same_output g-dmap || ok=1
    cmp -s g-cur-a.raw g-ours-a.raw && cmp -s c3-mixed.raw g-ours-a.raw || ok=1
    verdict "3g 'extract -d drive-a -r MAP' (no line for disk2 needed): output, exit status, target == reference's" $ok
    # A duplicated cluster in the skipped disk: no duplicate check for it (both succeed).
    "$PY" - g-cur.vma g-dup.vma <<'PYEOF'
import hashlib, struct, sys

data = bytearray(open(sys.argv[1], "rb").read())
offset = struct.unpack(">I", data[56:60])[0]
while True:  # drive-b (dev_id 2): cluster 1 renamed cluster 0
    count = struct.unpack(">H", data[offset + 6 : offset + 8])[0]
    for at in range(offset + 40, offset + 512, 8):
        word = struct.unpack(">Q", data[at : at + 8])[0]
        if (word >> 32) & 0xFF == 2 and word & 0xFFFFFFFF == 1:
            data[at : at + 8] = struct.pack(">Q", word & ~0xFFFFFFFF)
            data[offset + 24 : offset + 40] = bytes(16)
            data[offset + 24 : offset + 40] = hashlib.md5(data[offset : offset + 512]).digest()
            open(sys.argv[2], "wb").write(data)
            sys.exit(0)
    offset += 512 + 4096 * count
PYEOF
    both_run g-dupfull extract g-dup.vma g-dupfull-@W@
    same_failure "extract of an archive with a duplicated cluster" g-dupfull
    for who in cur ours; do aa_targets "$who" a:c3-mixed.raw c:c1-random.raw; done
    both_run g-dupskip extract -r g-map-@W@.txt g-dup.vma g-dupskip-@W@
    ok=0
    same_output g-dupskip || ok=1
    cmp -s c3-mixed.raw g-ours-a.raw && cmp -s c1-random.raw g-ours-c.raw || ok=1
    verdict "3g skip= of the disk with the duplicated cluster: both succeed, targets == images" $ok \
        "$(errline g-dupskip-cur) $(errline g-dupskip-ours)"
    # The qmrestore flow: zstd -dc ARCHIVE | vma extract -v -r FIFO - DIR, the map written once
    # the CTIME line is out.
    zstd -q -f g-cur.vma -o g-cur.vma.zst
    ok=0
    for who in cur ours; do
        exe=$CUR
        [ "$who" = ours ] && exe=$OURS
        aa_targets "$who" a:c3-mixed.raw b:c70-mixed.raw c:c1-random.raw
        mkfifo "g-fifo-$who"
        { zstd -q -d -c g-cur.vma.zst | "$exe" extract -v -r "g-fifo-$who" - "g-fifo-x-$who" \
            >"g-fifo-$who.out" 2>"g-fifo-$who.err"; echo $? >"g-fifo-$who.rc"; } 2>/dev/null &
        for _ in $(seq 300); do grep -q '^CTIME' "g-fifo-$who.out" 2>/dev/null && break; sleep 0.1; done
        cat "g-map-$who.txt" >"g-fifo-$who"
        wait $!
        [ "$(rc "g-fifo-$who")" = 0 ] || ok=1
        cmp -s c3-mixed.raw "g-$who-a.raw" && cmp -s c1-random.raw "g-$who-c.raw" && is_aa "g-$who-b.raw" || ok=1
        cmp -s qemu-server.conf "g-fifo-x-$who/qemu-server.conf" || ok=1
    done
    same_output g-fifo || ok=1
    verdict "3g qmrestore flow (zstd -dc | extract -v -r FIFO - DIR, skip=): output, config, every target == reference's" $ok \
        "$(errline g-fifo-cur) $(errline g-fifo-ours)"
fi

echo
if [ "$failures" -eq 0 ]; then
    echo "all checks passed"
else
    echo "$failures check(s) failed"
fi
[ "$failures" -eq 0 ]
