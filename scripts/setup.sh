#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a real job: install what vmjobs needs (apt +
# pip), start libvirt if it is not running, build the guest image, run a job on this host.
#   sudo scripts/setup.sh            everything, ending with a demo job
#   sudo scripts/setup.sh --no-demo  stop after building the image
set -eu -o pipefail
cd "$(dirname "$0")/.."

demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and starts libvirtd)" >&2
    exit 1
fi

echo "==> installing packages (apt)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# openssh-server: the --url ssh:// tests run a private sshd on a loopback port (none is started)
apt-get install -y -q --no-install-recommends \
    libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils \
    libvirt-clients libvirt-dev pkg-config gcc python3-dev cpio busybox-static iproute2 libxml2-utils \
    openssh-server \
    >/dev/null

echo "==> installing vmjobs (pip)"
python3 -m pip install -q -e ".[test]"

echo "==> starting libvirt"
scripts/start-libvirt.sh

echo "==> building the guest image"
vmjob image build

if [ "$demo" = 1 ]; then
    echo "==> running a job: 2 pinned vCPUs, 256 MiB"
    vmjob run --cpus 2 --mem 256M -- sh -c 'echo "hello from $VMJOB_ID: $(nproc) cpus"; uname -r'
fi
