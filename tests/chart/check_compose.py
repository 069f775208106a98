#!/usr/bin/env python3
"""Structural checks of docker-compose.yml (no Docker engine is needed or used).

Parses the file with PyYAML (anchors and merge keys resolved) and checks: the services
exist; the dependencies have healthchecks; producer and worker wait for healthy
dependencies and for the one-shot migration to complete; the connection URLs name
compose services; the producer has a JWT secret and publishes 8080; two worker replicas;
every build target exists in the Dockerfile; every bind-mounted path exists in the repo.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
REQUIRED = ("postgres", "rabbitmq", "redis", "migrate", "producer", "worker")
URL_VARS = ("BULKOPS__DATABASE__URL", "BULKOPS__AMQP__URL", "BULKOPS__REDIS__URL")


def main() -> int:
    passed = 0
    failures: list[str] = []

    def check(cond: bool, what: str) -> None:
        nonlocal passed
        if cond:
            passed += 1
        else:
            failures.append(what)

    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc.get("services") or {}
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I))

    for name in REQUIRED:
        check(name in services, f"service {name} exists")
    for name in ("postgres", "rabbitmq", "redis"):
        check(bool((services.get(name) or {}).get("healthcheck", {}).get("test")), f"{name} has a healthcheck")

    migrate = services.get("migrate") or {}
    check(migrate.get("command") == ["up"], "migrate runs `up`")
    check(str(migrate.get("restart", "no")) == "no", "migrate is one-shot (restart: no)")
    check((migrate.get("depends_on") or {}).get("postgres", {}).get("condition") == "service_healthy",
          "migrate waits for a healthy postgres")

    for name in ("producer", "worker"):
        svc = services.get(name) or {}
        deps = svc.get("depends_on") or {}
        check(deps.get("migrate", {}).get("condition") == "service_completed_successfully",
              f"{name} depends on migrate completing successfully")
        for dep in ("postgres", "rabbitmq", "redis"):
            check(deps.get(dep, {}).get("condition") == "service_healthy", f"{name} waits for a healthy {dep}")
        env = svc.get("environment") or {}
        for var in URL_VARS:
            host = urlsplit(str(env.get(var, ""))).hostname
            check(host in services, f"{name}: {var} points at a compose service (got {host})")
        check(str(svc.get("stop_grace_period", "")).rstrip("s").isdigit()
              and int(str(svc["stop_grace_period"]).rstrip("s")) > 30, f"{name}: stop_grace_period above 30 s")

    producer = services.get("producer") or {}
    check(bool((producer.get("environment") or {}).get("BULKOPS__AUTH__JWT_SECRET")), "producer has a JWT secret")
    check((producer.get("environment") or {}).get("BULKOPS__HTTP__BIND") == "0.0.0.0:8080", "producer binds 0.0.0.0:8080")
    check(any(str(p).split(":")[-1] == "8080" for p in producer.get("ports") or []), "producer publishes 8080")
    worker = services.get("worker") or {}
    check((worker.get("deploy") or {}).get("replicas") == 2, "two worker replicas")
    check((worker.get("environment") or {}).get("BULKOPS__METRICS__BIND") == "0.0.0.0:9090", "worker binds 0.0.0.0:9090")

    for name, svc in services.items():
        build = svc.get("build")
        if isinstance(build, dict) and build.get("target"):
            check(build["target"] in targets, f"{name}: build target {build['target']} exists in the Dockerfile")
        for vol in svc.get("volumes") or []:
            src = str(vol).split(":")[0]
            if src.startswith("./"):
                check((REPO / src).exists(), f"{name}: mounted path {src} exists")

    version = importlib.metadata.version("PyYAML")
    print("check_compose summary")
    print(f"  {COMPOSE.relative_to(REPO)} parsed with PyYAML {version} (no Docker engine: not started); "
          f"services {', '.join(sorted(services))}; Dockerfile targets {', '.join(sorted(targets))}")
    for f in failures:
        print(f"  FAILED {f}")
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
