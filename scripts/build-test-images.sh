#!/usr/bin/env bash
# Builds the images the test suite runs, from local rootfs trees: no registry is
# needed. Each image is skipped when it already exists, so a second run is quick.
#   qudata-test/busybox:1       busybox-static, no package manager, no sshd
#   qudata-test/debian:12       Debian bookworm minbase (apt, no sshd)
#   qudata-test/debian-ssh:12   the same with openssh-server installed
#   qudata-test/busybox-user:1  busybox whose USER is not root (renter, uid 1000)
#   qudata-test/busybox-exits:1 busybox whose ENTRYPOINT ignores its arguments and exits
#   qudata-test/debian-systemd:12  Debian bookworm that boots systemd as PID 1, with
#                               docker.io, iptables, python3-venv and ansible-core
#                               (tests/e2e/test_systemd_host.py, the Ansible role test)
set -euo pipefail

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=$(mktemp -d /tmp/qudata-images.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

have() { docker image inspect "$1" >/dev/null 2>&1; }

import_dir() { # DIR NAME [CHANGE...]
  local dir=$1 name=$2
  shift 2
  local changes=(-c 'CMD ["/bin/sh"]')
  for change in "$@"; do changes+=(-c "$change"); done
  tar -C "$dir" -c . | docker import "${changes[@]}" - "$name" >/dev/null
  echo "built $name"
}

busybox_root() { # the busybox tree, made once per run in $WORK/busybox
  [ -d "$WORK/busybox" ] && return 0
  local bb
  bb=$(command -v busybox || true)
  [ -x /bin/busybox ] && bb=/bin/busybox
  [ -n "$bb" ] || { echo "busybox-static is not installed" >&2; return 1; }
  local root=$WORK/busybox
  mkdir -p "$root"/{bin,etc,root,tmp,proc,sys,dev}
  cp "$bb" "$root/bin/busybox"
  for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\n' >"$root/etc/group"
}

build_busybox() {
  local name=qudata-test/busybox:1
  have "$name" && { echo "have $name"; return; }
  busybox_root
  import_dir "$WORK/busybox" "$name"
}

build_busybox_variants() {
  local user=qudata-test/busybox-user:1 exits=qudata-test/busybox-exits:1
  if have "$user"; then echo "have $user"; else
    busybox_root
    local root=$WORK/busybox-user
    cp -a "$WORK/busybox" "$root"
    printf 'renter:x:1000:1000:renter:/home/renter:/bin/sh\n' >>"$root/etc/passwd"
    printf 'renter:x:1000:\n' >>"$root/etc/group"
    mkdir -p "$root/home/renter"
    chown 1000:1000 "$root/home/renter"
    import_dir "$root" "$user" 'USER renter' 'WORKDIR /home/renter'
  fi
  if have "$exits"; then echo "have $exits"; else
    busybox_root
    import_dir "$WORK/busybox" "$exits" \
      'ENTRYPOINT ["/bin/sh", "-c", "echo the entrypoint ignores its arguments and exits"]'
  fi
}

build_debian() { # NAME [EXTRA_PACKAGES]
  local name=$1 include=${2:-}
  have "$name" && { echo "have $name"; return; }
  local root=$WORK/${name//[\/:]/_}
  local args=(--variant=minbase)
  [ -n "$include" ] && args+=("--include=$include")
  debootstrap "${args[@]}" bookworm "$root" "$MIRROR" >"$WORK/$(basename "$root").log" 2>&1 \
    || { tail -20 "$WORK/$(basename "$root").log" >&2; return 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  import_dir "$root" "$name"
}

# A host to boot: systemd as PID 1 (the container runs /sbin/init), Docker inside.
build_systemd() {
  local name=qudata-test/debian-systemd:12
  have "$name" && { echo "have $name"; return; }
  local root=$WORK/systemd
  debootstrap --variant=minbase \
    --include=systemd-sysv,dbus,docker.io,iptables,python3-venv,ca-certificates,procps,sqlite3,curl \
    bookworm "$root" "$MIRROR" >"$WORK/systemd.log" 2>&1 \
    || { tail -20 "$WORK/systemd.log" >&2; return 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  # Nothing a container boots needs a console or a clock; docker starts only when asked.
  local unit
  for unit in getty.target console-getty.service systemd-timesyncd.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
  done
  rm -f "$root"/etc/systemd/system/multi-user.target.wants/docker.service \
    "$root"/etc/systemd/system/sockets.target.wants/docker.socket
  : >"$root/etc/machine-id"
  tar -C "$root" -c . | docker import - "$name-base" >/dev/null
  # ansible-core (for the Ansible role's test) does not configure inside debootstrap:
  # installed with apt in a container of the base, then committed.
  local box=qudata-test-build-systemd-$$
  docker run --name "$box" --label qudata.test=build "$name-base" bash -c \
    'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ansible-core && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb' \
    >"$WORK/systemd-ansible.log" 2>&1 || {
    tail -20 "$WORK/systemd-ansible.log" >&2
    docker rm -f "$box" >/dev/null
    return 1
  }
  docker commit -c 'CMD ["/sbin/init"]' -c 'ENV container=docker' "$box" "$name" >/dev/null
  docker rm -f "$box" >/dev/null
  docker rmi "$name-base" >/dev/null
  echo "built $name"
}

build_busybox
build_busybox_variants
# The debootstraps are independent; run them side by side.
build_debian qudata-test/debian:12 & p1=$!
build_debian qudata-test/debian-ssh:12 openssh-server & p2=$!
build_systemd & p3=$!
rc=0
wait $p1 || rc=1
wait $p2 || rc=1
wait $p3 || rc=1
exit $rc
