#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a real job: install what vmjobs needs (apt, then
# pip into a virtual environment made from Debian's own Python), start libvirt if it is not
# running, build the guest image, run a job on this host.
#   sudo scripts/setup.sh            everything, ending with a demo job
#   sudo scripts/setup.sh --no-demo  stop after building the image
# Debian 12 marks its Python externally managed (PEP 668: pip may not install into it), so
# vmjobs lives in $VMJOBS_VENV (default /opt/vmjobs/venv), installed editable from this
# checkout with the test tools, and `vmjob` is linked into $VMJOBS_BIN_DIR (default
# /usr/local/bin). Idempotent: a second run installs nothing new.
set -eu -o pipefail
cd "$(dirname "$0")/.."

demo=1
[ "${1:-}" = "--no-demo" ] && demo=0
venv=${VMJOBS_VENV:-/opt/vmjobs/venv}
bin_dir=${VMJOBS_BIN_DIR:-/usr/local/bin}

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and starts libvirtd)" >&2
    exit 1
fi

echo "==> installing packages (apt)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# openssh-server: the --url ssh:// tests run a private sshd on a loopback port (none is started)
# python3-venv: the venv below; python3-apt: Ansible's apt module (tests/ansible)
apt-get install -y -q --no-install-recommends \
    libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils \
    libvirt-clients libvirt-dev pkg-config gcc libc6-dev python3-dev python3-venv python3-apt \
    cpio busybox-static iproute2 libxml2-utils openssh-server \
    >/dev/null

echo "==> installing vmjobs into $venv (Debian's /usr/bin/python3)"
if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    /usr/bin/python3 -m venv "$venv"
fi
# libvirt-python is compiled against the distribution's libvirt-dev here (~10 s)
"$venv/bin/python" -m pip install -q -e ".[test,provision]"
mkdir -p "$bin_dir"
ln -sfn "$venv/bin/vmjob" "$bin_dir/vmjob"

echo "==> starting libvirt"
scripts/start-libvirt.sh

echo "==> building the guest image"
"$venv/bin/vmjob" image build

if [ "$demo" = 1 ]; then
    echo "==> running a job: 2 pinned vCPUs, 256 MiB"
    "$venv/bin/vmjob" run --cpus 2 --mem 256M -- \
        sh -c 'echo "hello from $VMJOB_ID: $(nproc) cpus"; uname -r'
fi
