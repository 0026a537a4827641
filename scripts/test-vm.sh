#!/usr/bin/env bash
# The agent on a Debian 13 VM (cgroup v2, Docker 26, nftables) under QEMU:
# builds the VM image once (scripts/vm/build-image.sh), boots it once, and
# runs tests/vm/ (the e2e essentials inside the guest, install.sh from
# scratch). Software emulation makes it slow (about 10 minutes on two cores
# with the image cached, 5 more to build it), so it is not part of
# scripts/test.sh; run it before every release.
# Extra arguments go to pytest.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

need_root
apt_install qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client
ensure_dockerd
ensure_venv test
"$ROOT/scripts/build-test-images.sh"
"$ROOT/scripts/vm/build-image.sh"
cd "$ROOT"
QUDATA_VM_TESTS=1 exec "$VENV/bin/pytest" -p no:randomly -s tests/vm "$@"
