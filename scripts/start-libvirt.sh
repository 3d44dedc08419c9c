#!/usr/bin/env bash
# Start virtlogd and libvirtd on a machine without systemd, unless they already run.
# Idempotent: never starts a second copy.
set -eu -o pipefail

# /dev/kvm readable only by root makes libvirt decide on every start that its cached QEMU
# capabilities are stale and re-probe QEMU: every guest start then takes ~45 s.
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm
fi

if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl start virtlogd.socket libvirtd.socket 2>/dev/null || systemctl start libvirtd
    exit 0
fi

pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d
fi
for _ in $(seq 1 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
    sleep 0.2
done
echo "start-libvirt: libvirtd did not answer on qemu:///system within 10 s" >&2
exit 1
