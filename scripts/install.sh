#!/usr/bin/env bash
# Install everything Ember needs on Debian 12 (as root): QEMU, a guest kernel,
# image tools, a C compiler for the guest agent, and a Python venv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root: Ember gives every VMM its own uid and cgroup" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt_packages=(
    qemu-system-x86 qemu-utils          # the VMM and qcow2 tooling
    linux-image-cloud-amd64             # the guest kernel (virtio, small)
    mmdebstrap e2fsprogs                # the built-in Debian base image
    gcc libc6-dev                       # static guest agent and jailer
    busybox-static nftables             # image builds: tools in the build VM, its egress filter
    docker-registry skopeo              # tests: a real registry on 127.0.0.1 and a way to push to it
    python3 python3-venv python3-dev
)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
echo "install.sh: ready (.venv/bin/ember)"
