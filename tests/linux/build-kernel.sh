#!/usr/bin/env bash
# Builds the Linux test kernel for `make test-linux`, or reuses a cached one.
#
# Debian's kernel source package (by name, through apt), `make tinyconfig`,
# the options of tests/linux/config-fragment, the source patches of
# tests/linux/patches/ (applied in name order), `make vmlinux`.
# The kernel is cached in $KVMMEM_LINUX_CACHE/<key>/vmlinux (default
# ~/.cache/kvmmem/linux), where <key> hashes the source package's version,
# the fragment and the patches: the same inputs are never built twice.
# Leaves build/linux/vmlinux (a link into the cache) and build/linux/cmdline
# (the command line the tests append; kvmmem adds console= and the
# virtio_mmio.device= entries itself).
#
# If a step fails, one line on stderr names it ("build-kernel: FAILED: ...").
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
pkg=${KVMMEM_LINUX_PACKAGE:-linux-source-6.1}
cache=${KVMMEM_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvmmem/linux}
jobs=${KVMMEM_LINUX_JOBS:-2}
out=$root/build/linux
deps="build-essential flex bison bc libelf-dev libssl-dev"

step="start"
log=""
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "build-kernel: FAILED: step \"$step\" (exit $rc)${log:+, log: $log}" >&2; fi' EXIT

say() { echo "build-kernel: $*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

apt_updated=0
apt_update() {
    if [ $apt_updated -eq 0 ]; then
        as_root apt-get update -q >/dev/null
        apt_updated=1
    fi
}

step="install build dependencies ($deps)"
missing=""
for d in $deps; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "ok installed" || missing="$missing $d"
done
if [ -n "$missing" ]; then
    say "installing$missing"
    apt_update
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q $missing >/dev/null
fi

step="find $pkg with apt"
version=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    apt_update
    version=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
fi
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    step="find $pkg with apt (no installable version in the configured suites)"
    exit 1
fi

step="hash the inputs"
key=$( { echo "$pkg=$version"; cat "$here/config-fragment";
         for p in "$here"/patches/*.patch; do echo "== $(basename "$p")"; cat "$p"; done; } \
       | sha256sum | cut -c1-16)
dir=$cache/$key
mkdir -p "$cache" "$out"
cp "$here/cmdline" "$out/cmdline"

exec 9>"$cache/.lock"
flock 9
if [ -s "$dir/vmlinux" ]; then
    ln -sfn "$dir/vmlinux" "$out/vmlinux"
    say "cached kernel $pkg $version ($key): $out/vmlinux"
    exit 0
fi

say "building $pkg $version ($key) in $dir at -j$jobs"
start=$(date +%s)
rm -rf "$dir"
mkdir -p "$dir" "$cache/dl"

step="download $pkg=$version with apt-get download"
deb=$(ls "$cache/dl/${pkg}_${version//:/%3a}_"*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
    (cd "$cache/dl" && apt-get download -q "$pkg=$version" >/dev/null 2>&1) \
        || (apt_update && cd "$cache/dl" && apt-get download -q "$pkg=$version" >/dev/null)
    deb=$(ls "$cache/dl/${pkg}_${version//:/%3a}_"*.deb | head -1)
fi

step="unpack $(basename "$deb")"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" ./usr/src/
tarball=$(ls "$dir"/usr/src/linux-source-*.tar.* | head -1)
tar -xaf "$tarball" -C "$dir"
rm -rf "$dir/usr"
src=$(ls -d "$dir"/linux-source-*/ | head -1)
src=${src%/}

for p in "$here"/patches/*.patch; do
    step="apply patch $(basename "$p")"
    patch -p1 --forward --batch --quiet -d "$src" < "$p"
done

step="configure (tinyconfig + config-fragment + olddefconfig)"
log=$dir/config.log
{
    make -C "$src" tinyconfig
    "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/config-fragment"
    make -C "$src" olddefconfig
} >"$log" 2>&1
for opt in $(sed -n 's/^\(CONFIG_[A-Z0-9_]*\)=.*/\1/p' "$here/config-fragment"); do
    want=$(grep "^$opt=" "$here/config-fragment")
    step="configure: $want did not stick in .config"
    grep -qx "$want" "$src/.config"
done

step="make vmlinux (-j$jobs)"
log=$dir/build.log
make -C "$src" -j"$jobs" vmlinux >"$log" 2>&1
cp "$src/vmlinux" "$dir/vmlinux.tmp"
mv "$dir/vmlinux.tmp" "$dir/vmlinux"
echo $(( $(date +%s) - start )) >"$dir/build-seconds"
if [ "${KVMMEM_LINUX_KEEP_SRC:-0}" != "1" ]; then
    rm -rf "$src"                       # about 1 GB; the kernel is all the tests need
fi
ln -sfn "$dir/vmlinux" "$out/vmlinux"
say "built in $(cat "$dir/build-seconds") s: $out/vmlinux"
