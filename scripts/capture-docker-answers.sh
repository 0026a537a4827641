#!/usr/bin/env bash
# Captures what the Docker Engine API answers to the calls the agent reads
# (container inspect and list, image inspect and list, network inspect,
# events, info), for tests/unit/samples/docker/<version>/. Run on each engine
# the agent supports (this host's, and the Debian 13 test VM's) and commit the
# result: tests/unit/test_docker_answers.py reads both.
#
#   bash scripts/capture-docker-answers.sh OUTDIR [IMAGE]
#
# It makes one labelled container (and network), and removes both.
set -euo pipefail
OUT=${1:?usage: capture-docker-answers.sh OUTDIR [IMAGE]}
IMAGE=${2:-qudata-test/busybox:1}
SOCK=/var/run/docker.sock
NAME=qudata-capture-$$
mkdir -p "$OUT"
api() { curl -sf --unix-socket "$SOCK" "http://localhost/$1"; }
VERSION=$(api version | python3 -c 'import json,sys; print(json.load(sys.stdin)["ApiVersion"])')
v() { api "v$VERSION/$1"; }
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  docker network rm "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
docker network create --driver bridge -o com.docker.network.bridge.enable_icc=false \
  -o com.docker.network.bridge.name=qdcap0 --label qudata.test=capture "$NAME" >/dev/null
since=$(date +%s)
docker run -d --name "$NAME" --network "$NAME" --label qudata.instance_id=capture \
  --label qudata.agent_id=capture -p 127.0.0.1::8080 --restart on-failure:2 \
  "$IMAGE" sleep 600 >/dev/null
docker stop -t 1 "$NAME" >/dev/null
docker start "$NAME" >/dev/null
until=$(($(date +%s) + 1))
sleep 1
# Machine-specific values (ids stay: the agent reads them) are kept as Docker gave them.
v "containers/$NAME/json" | python3 -m json.tool >"$OUT/container_inspect.json"
v "containers/json?all=1&size=1&filters=%7B%22label%22%3A%5B%22qudata.agent_id%3Dcapture%22%5D%7D" |
  python3 -m json.tool >"$OUT/container_list.json"
v "images/$IMAGE/json" | python3 -m json.tool >"$OUT/image_inspect.json"
v "networks/$NAME" | python3 -m json.tool >"$OUT/network_inspect.json"
v "events?since=$since&until=$until&filters=%7B%22type%22%3A%5B%22container%22%5D%2C%22label%22%3A%5B%22qudata.agent_id%3Dcapture%22%5D%7D" |
  python3 -c 'import json,sys; print(json.dumps([json.loads(l) for l in sys.stdin if l.strip()], indent=1))' \
    >"$OUT/events.json"
v info | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d.get(k) for k in ("ServerVersion","Driver","DriverStatus","DockerRootDir","CgroupVersion","CgroupDriver","Runtimes","DefaultRuntime","LiveRestoreEnabled","RegistryConfig")}, indent=1))' \
  >"$OUT/info.json"
echo "$VERSION" >"$OUT/api_version"
echo "captured API $VERSION into $OUT"
