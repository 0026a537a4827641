#!/usr/bin/env bash
# Regenerates docs/reliability.md from one run on this machine (as root): the
# load, instance-create, multi-create, SSH-login and stats-tick benchmarks,
# then the fault and bad-input suites, one after the other. Takes about 15-30
# minutes; run it on an otherwise quiet host. Installs what it needs first, like test.sh.
# Extra arguments go to bench/reliability_report.py (e.g. --only load,fuzz).
# Exit status: 0 all passed, 1 a step failed, 2 a step could not run; the
# report is written in every case.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

need_root
apt_install busybox-static debootstrap openssh-client git
ensure_dockerd
ensure_venv test
"$ROOT/scripts/build-test-images.sh"

cd "$ROOT"
say "reliability report (docs/reliability.md)"
exec "$VENV/bin/python" bench/reliability_report.py "$@"
