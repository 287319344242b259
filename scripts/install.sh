#!/usr/bin/env bash
# Install everything Ember needs on Debian 12 (as root): QEMU, a guest kernel,
# image tools, a C compiler for the guest agent, PostgreSQL for the tests, and a Python venv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root: Ember gives every VMM its own uid and cgroup" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# QEMU 10 comes from bookworm-backports: it maps a template's RAM from a read-only file
# (readonly=on,rom=off), which QEMU 7.2 cannot, and has mapped-ram migration.
backports=/etc/apt/sources.list.d/ember-bookworm-backports.sources
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$backports" <<'EOF2'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF2
    apt-get update -q
fi
qemu_version=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
if ! dpkg --compare-versions "${qemu_version:-0}" ge 1:10.0; then
    echo "install.sh: apt-get install -t bookworm-backports qemu-system-x86 qemu-utils (QEMU 10)"
    apt-get update -q
    apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
fi
apt_packages=(
    linux-image-cloud-amd64             # the guest kernel (virtio, small)
    mmdebstrap e2fsprogs                # the built-in Debian base image
    gcc libc6-dev                       # static guest agent and jailer
    busybox-static nftables             # image builds: tools in the build VM, its egress filter
    iproute2                            # VM egress: network namespaces, veths, taps (ember.network)
    docker-registry skopeo              # tests: a real registry on 127.0.0.1 and a way to push to it
    postgresql                          # tests: the suite's second pass runs on it (scripts/postgres.sh)
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
