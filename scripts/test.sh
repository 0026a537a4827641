#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian/Ubuntu machine (as root):
# installs what it needs, starts dockerd if it is not running, builds the test
# images once, then lint, type check and every test (unit, integration against
# the real Docker engine, end to end against the real agent process).
# Extra arguments go to pytest.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

need_root
# openssh-server, patchelf and busybox-static make the agent's SSH bundle; docker-registry
# and apache2-utils (htpasswd) are the image tests' real registry; wireguard-tools and
# wireguard-go: tunnel mode and the relay of its test; runsc: gVisor, the sandbox
# isolation tier.
apt_install busybox-static debootstrap openssh-client openssh-server patchelf git shellcheck \
  systemd btrfs-progs iproute2 docker-registry apache2-utils nftables e2fsprogs xfsprogs \
  wireguard-tools wireguard-go runsc
ensure_dockerd
ensure_venv test
ensure_sandbox_runtime
"$ROOT/scripts/build-test-images.sh"

cd "$ROOT"
say "ruff"
"$VENV/bin/ruff" check src tests bench
"$VENV/bin/ruff" format --check src tests bench
say "mypy --strict"
"$VENV/bin/mypy"
say "pytest"
set +e
"$VENV/bin/pytest" "$@"
rc=$?
set -e
# pytest's 5 means it collected no test: never a pass.
[ $rc -eq 5 ] && die "pytest collected no tests"
exit $rc
