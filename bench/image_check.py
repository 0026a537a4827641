"""Create from a cached, unchanged tag (one registry check) against `docker run -d` of it.

What it measures, per run (default 7 runs, at least 5):

(a) agent: the real `qudata-agent run` process (as bench/instance_create.py
    starts it) creates an instance from `127.0.0.1:PORT/bench/app:1`, an image
    of a real registry on loopback (Debian's `docker-registry`, htpasswd
    authentication) that is already in Docker's cache; the order carries the
    registry credentials, so the agent asks the registry (with them) whether
    the tag still names the cached digest before it creates the container.
    Timed from `POST /instances` until `GET /instances` first says `running`.
(b) baseline: `docker run -d` of the same local image with the same limits
    and a published port, on a network like the agent's.
(c) the same `docker run -d` on Docker's default bridge, for information.

The three run in the same iteration in rotating order, after one untimed
warm-up. It prints the medians, the ratio median(a)/median(b) against the
target of at most 1.3x with PASS or FAIL, the registry requests one create
made (from the registry's access log), and checks that every create was
checked and none pulled. Exit status: 0 PASS, 1 FAIL, 2 error, 130 interrupted.

Needs a running Docker engine, `docker-registry` and `htpasswd` (Debian's
docker-registry and apache2-utils) and the local image
`qudata-test/busybox:1` (`scripts/build-test-images.sh`). Everything it makes
(the registry, its image, the agent, containers) is removed on the way out.
Run from the repository root:

    .venv/bin/python bench/image_check.py [--runs N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from _common import (
    AgentProc,
    BenchError,
    docker_version,
    exit_code,
    interrupt_on_signals,
    need_images,
    signals_ignored,
)
from instance_create import CREATE_BODY, PORT_RANGE, Bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.registry import Registry  # type: ignore[import-not-found]  # the tests' registry

TARGET_RATIO = 1.3
MIN_RUNS = 5
NAME = "bench/app"


def _prepare(registry: Registry) -> str:
    """Pushes the image and pulls it back, so it is cached with its registry digest."""
    ref: str = registry.push_new(NAME)[0]
    pulled = subprocess.run(
        ["docker", "pull", "-q", ref], env=registry.docker_env, capture_output=True, text=True
    )
    if pulled.returncode != 0:
        raise BenchError(f"docker pull {ref} failed: {pulled.stderr.strip()}")
    return ref


def _check_samples(log: str, runs: int) -> list[str]:
    problems = []
    if "pulling image" in log:
        problems.append("the agent pulled the image: the tag was not taken as unchanged")
    checks = log.count('"image unchanged in the registry"')
    if checks < runs:
        problems.append(f"{checks} registry checks logged for {runs} creates")
    return problems


def report(
    bench: Bench, registry: Registry, before: int, runs: int, warmup: int, engine: str
) -> bool:
    a = [s.total_ms for s in bench.agent_samples]
    b, c = bench.docker_samples, bench.bridge_samples
    ratio = statistics.median(a) / statistics.median(b)
    passed = ratio <= TARGET_RATIO
    creates = runs + warmup
    manifests = registry.manifest_requests(NAME) - before
    print()
    print(f"create from a cached unchanged tag: {runs} runs (+{warmup} warm-up), Docker {engine}")
    print(f"{'':36}{'median':>10}{'min':>10}{'max':>10}")
    for name, values in (
        ("(a) agent, tag checked", a),
        ("(b) docker run -d, own network", b),
        ("(c) docker run -d, default bridge", c),
    ):
        print(
            f"{name:36}{statistics.median(values):8.1f}ms{min(values):8.1f}ms{max(values):8.1f}ms"
        )
    verdict = "PASS" if passed else "FAIL"
    print(f"ratio median(a)/median(b) = {ratio:.3f}x   target: at most {TARGET_RATIO}x   {verdict}")
    print(
        f"registry: {manifests / creates:.1f} manifest requests per create"
        f" (the daemon's HEAD of the tag and GET by digest), no layer fetched"
    )
    print("raw samples (ms): (a) " + ", ".join(f"{v:.1f}" for v in a))
    print("                  (b) " + ", ".join(f"{v:.1f}" for v in b))
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=7, help=f"timed runs (at least {MIN_RUNS})")
    args = parser.parse_args(argv)
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}")
    warmup = 1
    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="qudata-bench-"))
    agent = AgentProc(workdir, PORT_RANGE)
    bench = Bench(agent)
    registry: Registry | None = None
    code, problems = 2, []
    try:
        engine = docker_version()
        need_images("qudata-test/busybox:1")
        registry = Registry.start(private=True)
        ref = _prepare(registry)
        before = registry.manifest_requests(NAME)
        image, _, tag = ref.rpartition(":")
        bench.create_body = {
            **CREATE_BODY,
            "image": image,
            "image_tag": tag,
            **registry.credentials(),
        }
        bench.image = ref
        agent.extra_env.update(registry.allow_env)  # the registry is on loopback
        agent.start()
        agent.wait_ready()
        bench.connect()
        bench.make_network()
        for i in range(warmup + args.runs):
            record = i >= warmup
            bench.iteration(i - warmup if record else i, record)
            print("." if record else "w", end="", flush=True)
        passed = report(bench, registry, before, args.runs, warmup, engine)
        wrong = _check_samples(agent.log_path.read_text(), args.runs + warmup)
        for line in wrong:
            print(f"FAIL: {line}")
        code = 0 if passed and not wrong else 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, OSError, RuntimeError, httpx.HTTPError, subprocess.SubprocessError) as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        code = 2
    finally:
        with signals_ignored():
            problems += bench.cleanup()
            if registry is not None:
                registry.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code(code, problems)


if __name__ == "__main__":
    sys.exit(main())
