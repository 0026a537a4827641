#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine (as root) and runs the agent in the
# foreground, standalone (no control plane), with its state in ./state.
# Extra arguments go to `qudata-agent run`; QUDATA_* variables are honoured.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

need_root
ensure_dockerd
# What the agent's SSH for instances is made from (nothing is installed into images).
apt_install openssh-server patchelf busybox-static
ensure_venv "" # no extras
export QUDATA_STATE_DIR=${QUDATA_STATE_DIR:-$ROOT/state}
say "agent state in $QUDATA_STATE_DIR; the agent secret is in $QUDATA_STATE_DIR/agent_secret"
exec "$VENV/bin/qudata-agent" run "$@"
