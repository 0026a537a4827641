#!/usr/bin/env bash
# Builds the Debian 13 (trixie) test VM once and keeps it: a root filesystem
# made by debootstrap from the Debian mirror, the distribution's kernel,
# systemd, docker.io, nftables, and a venv with the agent's Python
# dependencies, written into an ext4 disk image. The VM boots that kernel
# directly (no boot loader) on cgroup v2; tests/vm/ boots it under QEMU.
#
#   bash scripts/vm/build-image.sh [DIR]     # default /var/cache/qudata-test-vm
#
# DIR gets base.img (raw ext4, never written by a test: each boot uses a
# qcow2 overlay), vmlinuz, initrd.img, the root login key id_ed25519, and
# stamp (a hash of this script and pyproject.toml's [project] tables: a
# change of either rebuilds).
# Needs root, debootstrap, e2fsprogs; runs natively (chroot), not emulated.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DIR=${1:-${QUDATA_VM_DIR:-/var/cache/qudata-test-vm}}
MIRROR=${QUDATA_VM_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
DISK_GB=12
say() { printf '==> %s\n' "$*" >&2; }

# The project's own tables only (its dependencies): a linter's setting is no reason
# to rebuild.
stamp=$({ cat "${BASH_SOURCE[0]}"; sed -n '/^\[project/,/^\[tool\./p' "$ROOT/pyproject.toml"; } |
  sha256sum | cut -c1-16)
if [ -f "$DIR/stamp" ] && [ "$(cat "$DIR/stamp")" = "$stamp" ] && [ -f "$DIR/base.img" ]; then
  say "VM image is current ($DIR)"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
mkdir -p "$DIR"
WORK=$(mktemp -d "$DIR/build.XXXXXX")
ROOTFS=$WORK/rootfs
cleanup() {
  for m in proc sys dev/pts dev; do umount -l "$ROOTFS/$m" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# What the VM is: what a provider's Debian 13 server has after `apt-get
# install docker.io`, plus what the agent's SSH bundle is made from and the
# tools the tests use inside (curl, iproute2, ssh client).
PACKAGES=(
  systemd-sysv udev dbus kmod linux-image-amd64 initramfs-tools
  docker.io docker-cli containerd runc nftables iptables ca-certificates
  openssh-server openssh-client patchelf busybox-static
  python3 python3-venv iproute2 procps curl e2fsprogs xfsprogs
  wireguard-tools iperf3 sqlite3
)
say "debootstrap $SUITE into $ROOTFS"
debootstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
  tail -30 "$WORK/debootstrap.log" >&2
  exit 1
}

say "configuring the guest"
echo qudata-vm >"$ROOTFS/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 qudata-vm\n' >"$ROOTFS/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$ROOTFS/etc/fstab"
printf 'src /src 9p trans=virtio,version=9p2000.L,msize=262144,ro,nofail 0 0\n' >>"$ROOTFS/etc/fstab"
mkdir -p "$ROOTFS/src"
printf '9p\n9pnet\n9pnet_virtio\n' >"$ROOTFS/etc/modules-load.d/9p.conf"
# QEMU's user network hands out an address by DHCP; networkd takes it.
cat >"$ROOTFS/etc/systemd/network/20-wired.network" <<'NET'
[Match]
Name=en* eth*
[Network]
DHCP=yes
NET
ln -sf /lib/systemd/system/systemd-networkd.service \
  "$ROOTFS/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
echo "nameserver 10.0.2.3" >"$ROOTFS/etc/resolv.conf"
# The root login is the build's own key, for the tests' ssh client only.
rm -f "$WORK/id_ed25519" "$WORK/id_ed25519.pub"
ssh-keygen -q -t ed25519 -N '' -C qudata-test-vm -f "$WORK/id_ed25519"
install -d -m 700 "$ROOTFS/root/.ssh"
install -m 600 "$WORK/id_ed25519.pub" "$ROOTFS/root/.ssh/authorized_keys"
printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' \
  >"$ROOTFS/etc/ssh/sshd_config.d/qudata-test.conf"
# A serial console that logs in nobody, and no waiting for a network that
# QEMU's user net already gave.
ln -sf /dev/null "$ROOTFS/etc/systemd/system/systemd-networkd-wait-online.service"

say "the agent's Python dependencies into /opt/qudata-test-venv"
mount -t proc proc "$ROOTFS/proc"
mount --bind /dev "$ROOTFS/dev"
mount --bind /dev/pts "$ROOTFS/dev/pts"
mount -t sysfs sys "$ROOTFS/sys"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# The guest trusts what this host trusts: a proxy's or a company's own CA
# (PyPI and the mirror may be reached through one).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1
fi
mkdir -p "$ROOTFS/tmp/agent"
cp -a "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/src" "$ROOTFS/tmp/agent/"
chroot "$ROOTFS" /bin/sh -c '
  set -e
  python3 -m venv /opt/qudata-test-venv
  /opt/qudata-test-venv/bin/pip install -q --disable-pip-version-check "/tmp/agent[test]"
  /opt/qudata-test-venv/bin/pip uninstall -q -y qudata-agent
' >"$WORK/pip.log" 2>&1 || { tail -30 "$WORK/pip.log" >&2; exit 1; }
rm -rf "$ROOTFS/tmp/agent"
echo "nameserver 10.0.2.3" >"$ROOTFS/etc/resolv.conf"
for m in proc sys dev/pts dev; do umount -l "$ROOTFS/$m"; done
chroot "$ROOTFS" apt-get clean

cp -L "$ROOTFS/vmlinuz" "$WORK/vmlinuz"
cp -L "$ROOTFS/initrd.img" "$WORK/initrd.img"
say "writing the disk image"
truncate -s "${DISK_GB}G" "$WORK/base.img"
mkfs.ext4 -q -F -L qudata-vm -d "$ROOTFS" "$WORK/base.img"
for f in base.img vmlinuz initrd.img id_ed25519 id_ed25519.pub; do mv -f "$WORK/$f" "$DIR/$f"; done
echo "$stamp" >"$DIR/stamp"
say "VM image built in $DIR"
