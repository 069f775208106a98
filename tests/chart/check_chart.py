#!/usr/bin/env python3
"""Lints, renders and validates the bulkops Helm chart, once per values set in helm/bulkops/ci/.

For each values file:
  1. helm lint (helm-sdkpy's Lint, Helm v4 as a library) of a copy of the chart whose
     values.yaml is the file merged over the chart's values.yaml: chart metadata,
     templates, values.schema.json. Errors fail; warnings are printed.
  2. helm install of the chart with those values (helm-sdkpy's Install) into
     stub_apiserver.StubApiServer, which advertises the built-in APIs plus
     monitoring.coreos.com/v1 and keda.sh/v1alpha1, so that templates gated on
     .Capabilities render. Release storage is in memory. The rendered manifests (hooks
     included) and NOTES are read back from the release.
  3. kubernetes-validate (strict: unknown fields are errors) of every rendered object of
     a built-in kind against the Kubernetes KUBE_VERSION JSON schemas. CRD kinds
     (ServiceMonitor, ScaledObject, TriggerAuthentication) have no schema there and get
     the structural assertions below instead.
  4. Assertions on what the chart promises (security contexts, probes, grace periods,
     checksum annotations, hook annotations, secrets wiring, autoscaling, the TOML config
     against config/default.toml, the dashboard), derived from the values in force.
Then negative cases: values the chart must refuse.

Run through tests/chart/run.sh, which provides the pinned virtualenv.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import importlib.metadata
import json
import os
import shutil
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "bulkops"
KUBE_VERSION = "1.30"
CRD_APIS = ["monitoring.coreos.com/v1", "keda.sh/v1alpha1"]
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "TriggerAuthentication"}
RELEASE = "ci"
NAMESPACE = "bulkops-ci"
SECRET_ENV = {
    "database-url": "BULKOPS__DATABASE__URL",
    "amqp-url": "BULKOPS__AMQP__URL",
    "redis-url": "BULKOPS__REDIS__URL",
    "redis-nodes": "BULKOPS__REDIS__NODES",
    "jwt-secret": "BULKOPS__AUTH__JWT_SECRET",
    "operator-jwt-secret": "BULKOPS__AUTH__OPERATOR_JWT_SECRET",
    # Read only when the Secret holds it (an optional secretKeyRef).
    "amqp-urls": "BULKOPS__AMQP__URLS",
}
# Keys of config/default.toml the chart deliberately does not carry in its ConfigMap.
SECRET_KEYS = {("database", "url"), ("amqp", "url"), ("amqp", "urls"), ("redis", "url"), ("redis", "nodes")}
CHART_SET_KEYS = {("http", "bind"): "0.0.0.0:8080", ("metrics", "bind"): "0.0.0.0:9090"}


def work_dir() -> Path:
    target = Path(os.environ.get("TARGET_DIR", "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "chart-work"


def ensure_environment() -> None:
    """Re-executes this script with Helm's environment pointed inside target/.

    The Go runtime inside helm-sdkpy reads the environment once, when the library loads,
    so it must be set before the process starts: HELM_DRIVER=memory keeps releases in
    memory, and HOME/HELM_*_HOME/TMPDIR keep Helm's and kube's caches in the repo.
    """
    work = work_dir()
    want = {
        "HELM_DRIVER": "memory",
        "HOME": str(work / "home"),
        "HELM_CACHE_HOME": str(work / "home" / "cache"),
        "HELM_CONFIG_HOME": str(work / "home" / "config"),
        "HELM_DATA_HOME": str(work / "home" / "data"),
        "TMPDIR": str(work / "tmp"),
        "KUBECONFIG": str(work / "home" / "no-kubeconfig"),
    }
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("home/cache", "home/config", "home/data", "tmp", "lint"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})


ensure_environment()

import helm_sdkpy  # noqa: E402  (after the environment is in place)
import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stub_apiserver import KUBE_VERSION as STUB_KUBE_VERSION  # noqa: E402
from stub_apiserver import StubApiServer  # noqa: E402

LINT_SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


class Checks:
    """Counts assertions; collects failures instead of stopping at the first."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []
        self.context = ""

    def check(self, cond: bool, what: str) -> bool:
        if cond:
            self.passed += 1
        else:
            self.failures.append(f"[{self.context}] {what}")
            print(f"  FAIL {what}")
        return bool(cond)


def merge(base: dict, override: dict) -> dict:
    """Helm's coalescing: maps merge, everything else replaces, null deletes."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lint(name: str, values: dict, c: Checks) -> None:
    chart = work_dir() / "lint" / name / "bulkops"
    shutil.rmtree(chart.parent, ignore_errors=True)
    shutil.copytree(CHART, chart)
    (chart / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace=NAMESPACE)).run(str(chart)))
    messages = result.get("Messages") or []
    for m in messages:
        sev = LINT_SEVERITY.get(m.get("Severity"), "?")
        if sev != "INFO":
            # helm-sdkpy serialises Go errors as {}: only severity and path survive.
            print(f"  lint {sev}: {m.get('Path')} {m.get('Err') or ''}")
    errors = [m for m in messages if m.get("Severity", 0) >= 3] + (result.get("Errors") or [])
    c.check(result.get("TotalChartsLinted") == 1, "lint linted the chart")
    c.check(not errors, f"helm lint reports no errors (got {len(errors)}; the render step shows details)")
    warnings = sum(1 for m in messages if m.get("Severity") == 2)
    print(f"  lint: {len(messages)} message(s), {warnings} warning(s), {len(errors)} error(s)")


def render(values: dict, apis: list[str]) -> dict:
    """Installs the chart into a stub API server; returns the release (manifests, hooks, notes)."""
    with StubApiServer(apis) as stub:
        cfg = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=stub.kubeconfig())
        return asyncio.run(
            helm_sdkpy.Install(cfg).run(RELEASE, str(CHART), values=values or None, wait=False, timeout=120)
        )


def documents(release: dict) -> tuple[list[dict], list[dict]]:
    objects = [d for d in yaml.safe_load_all(release.get("manifest") or "") if d]
    hooks = [d for h in release.get("hooks") or [] for d in yaml.safe_load_all(h.get("manifest") or "") if d]
    return objects, hooks


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o.get("kind") == kind}


def validate_schemas(objs: list[dict], c: Checks) -> tuple[int, int]:
    validated = skipped = 0
    for o in objs:
        if o["kind"] in CRD_KINDS:
            skipped += 1
            continue
        try:
            kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
            validated += 1
            c.check(True, "")
        except kubernetes_validate.ValidationError as e:
            c.check(False, f"{o['kind']}/{o['metadata']['name']} invalid for Kubernetes {KUBE_VERSION}: "
                           f"{'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            c.check(False, f"{o['kind']}/{o['metadata']['name']}: {e.message}")
    return validated, skipped


def redis_keys(values: dict) -> tuple[list[str], list[str]]:
    """The Secret keys a program reaches Redis through, and those it may do without, by
    config.redis.mode: standalone redis-url; cluster redis-nodes; sentinel redis-nodes plus
    redis-url (the master's password and database) when given, optional with an existingSecret."""
    mode = values["config"]["redis"].get("mode", "standalone")
    if mode == "standalone":
        return ["redis-url"], []
    if mode == "cluster":
        return ["redis-nodes"], []
    if values.get("existingSecret"):
        return ["redis-nodes"], ["redis-url"]
    return (["redis-nodes", "redis-url"] if values["secrets"].get("redisUrl") else ["redis-nodes"]), []


def check_pod(kind_name: str, pod: dict, c: Checks, *, secret: str, secret_keys: list[str],
              config_map: str, probes: bool, optional_keys: list[str] | None = None) -> None:
    spec = pod["spec"]
    psc = spec.get("securityContext") or {}
    c.check(psc.get("runAsNonRoot") is True, f"{kind_name}: pod runAsNonRoot")
    c.check(psc.get("runAsUser") == 10001, f"{kind_name}: pod runAsUser 10001")
    c.check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{kind_name}: seccomp RuntimeDefault")
    c.check(spec.get("automountServiceAccountToken") is False, f"{kind_name}: no service account token mounted")
    annotations = pod["metadata"].get("annotations") or {}
    c.check(len(annotations.get("checksum/config", "")) == 64, f"{kind_name}: checksum/config annotation")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    c.check((volumes.get("config") or {}).get("configMap", {}).get("name") == config_map,
            f"{kind_name}: mounts ConfigMap {config_map}")
    for ctr in spec["containers"]:
        where = f"{kind_name}/{ctr['name']}"
        sc = ctr.get("securityContext") or {}
        c.check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
        c.check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false")
        c.check("ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{where}: capabilities drop ALL")
        c.check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
        res = ctr.get("resources") or {}
        c.check(bool(res.get("requests")) and bool(res.get("limits")), f"{where}: resource requests and limits")
        env = {e["name"]: e for e in ctr.get("env") or []}
        c.check((env.get("BULKOPS_CONFIG") or {}).get("value") == "/etc/bulkops/bulkops.toml",
                f"{where}: BULKOPS_CONFIG names the mounted TOML")
        for key in secret_keys:
            ref = ((env.get(SECRET_ENV[key]) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            c.check(ref == {"name": secret, "key": key}, f"{where}: {SECRET_ENV[key]} from Secret {secret} key {key}")
        for key in optional_keys or []:
            ref = ((env.get(SECRET_ENV[key]) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            c.check(ref == {"name": secret, "key": key, "optional": True},
                    f"{where}: {SECRET_ENV[key]} from Secret {secret} key {key}, optional")
        from_secrets = {n for n, e in env.items() if "secretKeyRef" in (e.get("valueFrom") or {})}
        c.check(from_secrets == {SECRET_ENV[k] for k in secret_keys + (optional_keys or [])},
                f"{where}: exactly the secret variables it needs ({', '.join(sorted(from_secrets))})")
        for name, e in env.items():
            if name.startswith("BULKOPS__") and any(w in name for w in ("URL", "SECRET")):
                c.check("value" not in e, f"{where}: {name} is not a literal value")
        mounts = {m["mountPath"] for m in ctr.get("volumeMounts") or []}
        c.check({"/etc/bulkops", "/tmp"} <= mounts, f"{where}: mounts /etc/bulkops and a writable /tmp")
        if probes:
            ports = {p["name"] for p in ctr.get("ports") or []}
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = (ctr.get(probe) or {}).get("httpGet") or {}
                c.check(get.get("path") == path and get.get("port") in ports,
                        f"{where}: {probe} GET {path} on a declared port")


def check_config(toml_text: str, values: dict, c: Checks, where: str) -> None:
    defaults = tomllib.loads((REPO / "config" / "default.toml").read_text())
    try:
        rendered = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        c.check(False, f"{where}: bulkops.toml is valid TOML ({e})")
        return
    c.check(True, "")
    for section, keys in rendered.items():
        for key, value in keys.items():
            known = section in defaults and key in defaults[section]
            c.check(known, f"{where}: [{section}] {key} is a key of config/default.toml")
            if known:
                c.check(type(value) is type(defaults[section][key]),
                        f"{where}: [{section}] {key} has the type of config/default.toml's")
            c.check((section, key) not in SECRET_KEYS, f"{where}: [{section}] {key} (a secret) not in the ConfigMap")
    for (section, key), value in CHART_SET_KEYS.items():
        c.check(rendered.get(section, {}).get(key) == value, f"{where}: [{section}] {key} = {value}")
    for section, keys in values["config"].items():
        for key, value in keys.items():
            c.check(rendered.get(section, {}).get(key) == value, f"{where}: [{section}] {key} follows values")


def check_release(name: str, values: dict, release: dict, apis: list[str], c: Checks) -> dict:
    objects, hooks = documents(release)
    everything = objects + hooks
    fullname = f"{RELEASE}-bulkops"
    producer, worker, migrate = (f"{fullname}-{x}" for x in ("producer", "worker", "migrate"))
    existing = values.get("existingSecret") or ""
    secret = existing or fullname
    keda = values["worker"]["keda"]["enabled"]
    hpa = values["worker"]["autoscaling"]["enabled"] and not keda
    monitor = values["serviceMonitor"]["enabled"] and "monitoring.coreos.com/v1" in apis
    ui = bool(values["config"].get("ui", {}).get("enabled"))

    c.check(all(o.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/instance") == RELEASE
                for o in everything), "every object carries the instance label")

    # Workloads.
    deployments = by_kind(objects, "Deployment")
    c.check(set(deployments) == {producer, worker}, f"Deployments {producer} and {worker}")
    redis_required, redis_optional = redis_keys(values)
    producer_keys = ["database-url", "amqp-url", *redis_required, "jwt-secret"] + (["operator-jwt-secret"] if ui else [])
    for dname, keys in ((producer, producer_keys),
                        (worker, ["database-url", "amqp-url", *redis_required])):
        d = deployments.get(dname)
        if not d:
            continue
        pod = d["spec"]["template"]
        c.check(pod["spec"].get("terminationGracePeriodSeconds", 30) > 30, f"{dname}: terminationGracePeriodSeconds > 30")
        c.check(("checksum/secret" in pod["metadata"].get("annotations", {})) == (not existing),
                f"{dname}: checksum/secret annotation exactly when the chart owns the Secret")
        sel = d["spec"]["selector"]["matchLabels"]
        c.check(sel.items() <= pod["metadata"]["labels"].items(), f"{dname}: selector matches its pod labels")
        check_pod(f"Deployment/{dname}", pod, c, secret=secret, secret_keys=keys, config_map=fullname, probes=True,
                  optional_keys=[*redis_optional, "amqp-urls"])
    # Traces: the standard OTEL_* environment on the producer and worker exactly when a
    # collector is named; never on the migration hook.
    otel = values.get("telemetry", {})
    endpoint = otel.get("otlpEndpoint") or ""
    for dname in (producer, worker):
        d = deployments.get(dname)
        if not d:
            continue
        env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        if endpoint:
            c.check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == endpoint
                    and env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == otel.get("protocol", "http/protobuf")
                    and env.get("OTEL_TRACES_SAMPLER") == otel.get("sampler", "parentbased_always_on")
                    and env.get("OTEL_TRACES_SAMPLER_ARG") == (otel.get("samplerArg") or None),
                    f"{dname}: OTEL_* follow telemetry (export on)")
        else:
            c.check(not any(k.startswith("OTEL_") for k in env), f"{dname}: no OTEL_* while telemetry.otlpEndpoint is empty")
    c.check("replicas" not in deployments.get(worker, {}).get("spec", {}) if (hpa or keda) else True,
            f"{worker}: no fixed replicas while an autoscaler owns the count")

    # Services select the pods and point at declared ports.
    services = by_kind(objects, "Service")
    c.check(set(services) == {producer, worker}, "Services for producer (API) and worker (metrics)")
    for sname, port_name in ((producer, "http"), (worker, "metrics")):
        s, d = services.get(sname), deployments.get(sname)
        if s and d:
            pod_labels = d["spec"]["template"]["metadata"]["labels"]
            c.check(s["spec"]["selector"].items() <= pod_labels.items(), f"Service {sname} selects its pods")
            c.check([p["targetPort"] for p in s["spec"]["ports"]] == [port_name], f"Service {sname} targets port {port_name}")
    if worker in services:
        c.check(services[worker]["spec"].get("clusterIP") == "None", f"Service {worker} is headless")

    # The migration hook and its hook-scoped config.
    jobs = by_kind(hooks, "Job")
    c.check(set(jobs) == {migrate}, f"migration Job {migrate} is a hook")
    job = jobs.get(migrate)
    if job:
        ann = job["metadata"]["annotations"]
        c.check(ann.get("helm.sh/hook") == "pre-install,pre-upgrade", "Job hook pre-install,pre-upgrade")
        job_env = job["spec"]["template"]["spec"]["containers"][0].get("env", [])
        c.check(not any(e["name"].startswith("OTEL_") for e in job_env), "the migration hook exports no traces")
        c.check({"before-hook-creation", "hook-succeeded"} <= set(ann.get("helm.sh/hook-delete-policy", "").split(",")),
                "Job hook-delete-policy before-hook-creation,hook-succeeded")
        ctr = job["spec"]["template"]["spec"]["containers"][0]
        c.check(ctr.get("args") == ["up"], "Job runs `bulkops-migrate up`")
        c.check(job["spec"]["template"]["spec"].get("restartPolicy") == "Never", "Job restartPolicy Never")
        check_pod(f"Job/{migrate}", job["spec"]["template"], c, secret=existing or migrate,
                  secret_keys=["database-url"], config_map=migrate, probes=False)
        weight = int(ann.get("helm.sh/hook-weight", "0"))
        for kind in ("ConfigMap",) + (() if existing else ("Secret",)):
            dep = by_kind(hooks, kind).get(migrate)
            c.check(dep is not None and int(dep["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight
                    and dep["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade",
                    f"hook {kind} {migrate} exists before the Job (lower hook weight)")
        if not existing:
            s = by_kind(hooks, "Secret").get(migrate) or {}
            c.check(set(s.get("data", {})) == {"database-url"}, "hook Secret holds only database-url")

    # Secrets.
    secrets = by_kind(everything, "Secret")
    if existing:
        c.check(not secrets, f"existingSecret={existing}: no Secret rendered")
    else:
        want = {"database-url", "amqp-url", "jwt-secret"}
        want |= {"redis-url"} if values["secrets"].get("redisUrl") else set()
        want |= {"redis-nodes"} if values["secrets"].get("redisNodes") else set()
        nodes = values["secrets"].get("amqpUrls") or []
        want |= {"amqp-urls"} if nodes else set()
        want |= {"operator-jwt-secret"} if values["secrets"].get("operatorJwtSecret") else set()
        data = secrets.get(fullname, {}).get("data", {})
        c.check(set(data) == want, f"Secret {fullname} has keys {', '.join(sorted(want))}")
        if values["secrets"].get("redisNodes"):
            c.check(base64.b64decode(data.get("redis-nodes", "")).decode() == ",".join(values["secrets"]["redisNodes"]),
                    f"Secret {fullname} redis-nodes holds secrets.redisNodes, comma-separated")
        if nodes:
            got = base64.b64decode(data.get("amqp-urls", "")).decode()
            c.check(got == ",".join(nodes), "Secret key amqp-urls holds secrets.amqpUrls, comma-separated")

    # Configuration.
    cms = by_kind(objects, "ConfigMap")
    for cname, cm in (("ConfigMap " + fullname, cms.get(fullname)), ("hook ConfigMap " + migrate, by_kind(hooks, "ConfigMap").get(migrate))):
        if c.check(cm is not None and "bulkops.toml" in cm.get("data", {}), f"{cname} holds bulkops.toml"):
            check_config(cm["data"]["bulkops.toml"], values, c, cname)

    # Autoscaling.
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    scaled = by_kind(objects, "ScaledObject")
    c.check(bool(hpas) == hpa, f"HPA rendered: {hpa}")
    c.check(bool(scaled) == keda, f"KEDA ScaledObject rendered: {keda}")
    c.check(not by_kind(objects, "TriggerAuthentication"), "no TriggerAuthentication rendered (KEDA reads Prometheus)")
    for h in hpas.values():
        c.check(h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker},
                "HPA scales the worker Deployment")
    for so in scaled.values():
        k = values["worker"]["keda"]
        c.check(so["apiVersion"] == "keda.sh/v1alpha1", "ScaledObject apiVersion keda.sh/v1alpha1")
        c.check(so["spec"]["scaleTargetRef"]["name"] == worker, "ScaledObject scales the worker Deployment")
        trig = so["spec"]["triggers"][0]
        meta = trig.get("metadata") or {}
        query = k["prometheus"]["query"] or (
            f'sum(max by (lane) (bulkops_lane_backlog_items{{namespace="{NAMESPACE}", service="{producer}"}}))')
        c.check(trig["type"] == "prometheus" and meta.get("serverAddress") == k["prometheus"]["serverAddress"],
                "ScaledObject triggers on Prometheus at worker.keda.prometheus.serverAddress")
        c.check(meta.get("query") == query and "bulkops_lane_backlog_items" in query,
                f"ScaledObject queries the backlog (ready + unacknowledged + unpublished items): {query}")
        c.check(meta.get("threshold") == str(k["backlogPerReplica"]), "ScaledObject threshold is backlogPerReplica")
        ref = k["prometheus"]["authenticationRef"]
        c.check(trig.get("authenticationRef") == ({"name": ref} if ref else None),
                f"ScaledObject authenticationRef follows worker.keda.prometheus.authenticationRef ({ref or 'none'})")

    # Disruption budgets.
    pdbs = by_kind(objects, "PodDisruptionBudget")
    for comp, dname in (("producer", producer), ("worker", worker)):
        if values[comp]["pdb"]["enabled"]:
            p, d = pdbs.get(dname), deployments.get(dname)
            c.check(p is not None and d is not None and p["spec"]["selector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"],
                    f"PodDisruptionBudget {dname} selects the {comp} pods")

    # Monitoring.
    monitors = by_kind(objects, "ServiceMonitor")
    c.check(bool(monitors) == monitor, f"ServiceMonitors rendered: {monitor} (enabled={values['serviceMonitor']['enabled']}, API advertised={'monitoring.coreos.com/v1' in apis})")
    for mname, port in ((producer, "http"), (worker, "metrics")):
        if monitor:
            m = monitors.get(mname)
            c.check(m is not None and m["spec"]["endpoints"][0]["port"] == port
                    and m["spec"]["endpoints"][0]["path"] == "/metrics"
                    and m["spec"]["selector"]["matchLabels"].items() <= services.get(mname, {}).get("metadata", {}).get("labels", {}).items(),
                    f"ServiceMonitor {mname} scrapes port {port} /metrics of its Service")
    dash = cms.get(f"{fullname}-dashboard")
    if values["dashboards"]["enabled"]:
        c.check(dash is not None and all(dash["metadata"]["labels"].get(k) == v for k, v in values["dashboards"]["labels"].items()),
                "dashboard ConfigMap carries the sidecar labels")
        if dash:
            c.check(json.loads(dash["data"]["bulkops.json"]) == json.loads((CHART / "dashboards" / "bulkops.json").read_text()),
                    "dashboard ConfigMap holds dashboards/bulkops.json")

    # Ingress.
    ingresses = by_kind(objects, "Ingress")
    c.check(bool(ingresses) == values["ingress"]["enabled"], f"Ingress rendered: {values['ingress']['enabled']}")
    for ing in ingresses.values():
        backends = [p["backend"]["service"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
        c.check(all(b == {"name": producer, "port": {"name": "http"}} for b in backends), "Ingress routes to the producer Service")
        if ui:
            for rule in ing["spec"]["rules"]:
                ui_paths = [p for p in rule["http"]["paths"] if p["path"] == "/ui"]
                c.check(len(ui_paths) == 1 and ui_paths[0]["pathType"] == "Prefix",
                        f"Ingress host {rule.get('host')} routes /ui (the console) to the producer, once")

    # Service account.
    sas = by_kind(objects, "ServiceAccount")
    c.check(bool(sas) == values["serviceAccount"]["create"], f"ServiceAccount rendered: {values['serviceAccount']['create']}")

    notes = (release.get("info") or {}).get("notes") or ""
    c.check("bulkops token" in notes and "bulkops batch watch" in notes and producer in notes,
            "NOTES explain reaching the API, getting a token and watching a batch")
    c.check(("bulkops token --operator" in notes and "/ui" in notes) == ui,
            f"NOTES explain reaching the console and minting an operator token exactly when it is on ({ui})")

    kinds: dict[str, int] = {}
    for o in everything:
        kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
    mode = values["config"]["redis"].get("mode", "standalone")
    return {"kinds": kinds, "keda": keda, "hpa": hpa, "monitor": monitor, "existing": bool(existing),
            "amqp_urls": bool(values["secrets"].get("amqpUrls")),
            "ingress": values["ingress"]["enabled"], "redis_cluster": mode == "cluster",
            "redis_sentinel": mode == "sentinel", "ui": ui, "objects": everything}


def expect_refusal(c: Checks, label: str, values: dict, needle: str) -> None:
    try:
        render(values, CRD_APIS)
    except helm_sdkpy.HelmError as e:
        c.check(needle in str(e), f"refused {label} with a message naming {needle!r} (got: {str(e)[:200]})")
        return
    c.check(False, f"refused {label}")


def main() -> int:
    c = Checks()
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    files = sorted((CHART / "ci").glob("*.yaml"))
    if not files:
        print("no values files in helm/bulkops/ci/")
        return 1
    summary = []
    features = {"keda": False, "hpa": False, "monitor": False, "existing": False, "ingress": False,
                "redis_cluster": False, "redis_sentinel": False, "amqp_urls": False, "ui": False}
    total_valid = total_skipped = 0
    for path in files:
        override = yaml.safe_load(path.read_text()) or {}
        values = merge(base, override)
        print(f"== {path.relative_to(REPO)}")
        c.context = path.name
        lint(path.stem, values, c)
        apis_sets = [CRD_APIS]
        if values["serviceMonitor"]["enabled"]:
            apis_sets.append([a for a in CRD_APIS if not a.startswith("monitoring.")])
        for apis in apis_sets:
            c.context = f"{path.name} apis={'+'.join(apis) or 'builtin'}"
            try:
                release = render(override, apis)
            except helm_sdkpy.HelmError as e:
                c.check(False, f"helm install renders: {e}")
                continue
            result = check_release(path.stem, values, release, apis, c)
            valid, skipped = validate_schemas(result["objects"], c)
            total_valid += valid
            total_skipped += skipped
            for k in features:
                features[k] |= result[k]
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(result["kinds"].items()))
            extra = "" if apis == CRD_APIS else " [without the ServiceMonitor API]"
            line = (f"{path.name}{extra}: lint ok; rendered {sum(result['kinds'].values())} objects ({kinds}); "
                    f"{valid} schema-validated, {skipped} CRD objects checked structurally")
            print(f"  {line}")
            summary.append(line)

    c.context = "coverage"
    for feature, seen in features.items():
        c.check(seen, f"some values set in helm/bulkops/ci/ exercises {feature}")

    c.context = "refusals"
    creds = yaml.safe_load((CHART / "ci" / "default-values.yaml").read_text())
    expect_refusal(c, "a misspelt key (producer.replicaCuont)", merge(creds, {"producer": {"replicaCuont": 3}}), "replicaCuont")
    expect_refusal(c, "missing secrets", {}, "secrets.databaseUrl is required")
    expect_refusal(c, "a worker grace period within the drain time",
                   merge(creds, {"worker": {"terminationGracePeriodSeconds": 20}}), "terminationGracePeriodSeconds")
    expect_refusal(c, "min_connections above max_connections",
                   merge(creds, {"config": {"database": {"min_connections": 20}}}), "min_connections")
    expect_refusal(c, "an unknown config key", merge(creds, {"config": {"worker": {"chunksize": 5}}}), "chunksize")
    expect_refusal(c, "an unknown Redis mode", merge(creds, {"config": {"redis": {"mode": "galaxy"}}}), "mode")
    expect_refusal(c, "Redis Cluster mode without nodes", merge(creds, {"config": {"redis": {"mode": "cluster"}}}),
                   "secrets.redisNodes must list the seed nodes")
    expect_refusal(c, "Sentinel mode without Sentinels", merge(creds, {"config": {"redis": {"mode": "sentinel"}}}),
                   "secrets.redisNodes must list the Sentinels")
    expect_refusal(c, "Redis nodes in standalone mode", merge(creds, {"secrets": {"redisNodes": ["redis://r0:6379"]}}),
                   "config.redis.mode is standalone")
    expect_refusal(c, "a Redis node that is no redis:// URL",
                   merge(creds, {"config": {"redis": {"mode": "cluster"}}, "secrets": {"redisNodes": ["http://r0:6379"]}}),
                   "redisNodes")
    expect_refusal(c, "KEDA without a Prometheus address",
                   merge(creds, {"worker": {"keda": {"enabled": True}}}), "worker.keda.prometheus.serverAddress")
    expect_refusal(c, "a cluster node URL that is not amqp://",
                   merge(creds, {"secrets": {"amqpUrls": ["amqp://a:b@n1/%2f", "http://n2"]}}), "amqpUrls")
    expect_refusal(c, "amqp.bulk_queues out of range", merge(creds, {"config": {"amqp": {"bulk_queues": 0}}}),
                   "bulk_queues")
    expect_refusal(c, "the removed keda.queueLength", merge(creds, {"worker": {"keda": {"queueLength": 5}}}),
                   "queueLength")

    expect_refusal(c, "the console without an operator secret", merge(creds, {"config": {"ui": {"enabled": True}}}),
                   "secrets.operatorJwtSecret is required")
    expect_refusal(c, "an operator secret equal to the JWT secret",
                   merge(creds, {"config": {"ui": {"enabled": True}},
                                 "secrets": {"operatorJwtSecret": creds["secrets"]["jwtSecret"]}}),
                   "must differ")
    expect_refusal(c, "an unknown ui.cookie_secure", merge(creds, {"config": {"ui": {"cookie_secure": "sometimes"}}}),
                   "cookie_secure")
    expect_refusal(c, "an OTLP protocol this build lacks (gRPC)",
                   merge(creds, {"telemetry": {"otlpEndpoint": "http://otel:4317", "protocol": "grpc"}}), "protocol")
    expect_refusal(c, "an OTLP endpoint that is not a URL",
                   merge(creds, {"telemetry": {"otlpEndpoint": "otel-collector:4318"}}), "otlpEndpoint")

    versions = {p: importlib.metadata.version(p) for p in ("helm-sdkpy", "kubernetes-validate", "PyYAML")}
    print()
    print("check_chart summary")
    print(f"  tools: helm-sdkpy {versions['helm-sdkpy']} (Helm v4 library: Lint, Install into a stub API "
          f"server reporting Kubernetes {STUB_KUBE_VERSION[2]}, HELM_DRIVER=memory), kubernetes-validate "
          f"{versions['kubernetes-validate']} (strict schemas, Kubernetes {KUBE_VERSION}), PyYAML {versions['PyYAML']}")
    for line in summary:
        print(f"  {line}")
    print(f"  refusals: misspelt value key, missing secrets, worker grace period <= 30 s, "
          f"min_connections > max_connections, unknown config key, unknown Redis mode, cluster/sentinel "
          f"mode without nodes, nodes in standalone mode, a node that is no redis:// URL, KEDA without "
          f"Prometheus, a non-AMQP cluster node URL, bulk_queues out of range, the removed keda.queueLength, "
          f"the console without an operator secret or with the JWT secret, an unknown ui.cookie_secure, "
          f"an OTLP protocol other than http/protobuf or http/json, an OTLP endpoint that is no http(s) URL")
    print(f"  {total_valid} objects schema-validated, {total_skipped} CRD objects (ServiceMonitor, ScaledObject, "
          f"TriggerAuthentication) not schema-validated (no schemas shipped for them)")
    print(f"{c.passed} passed, {len(c.failures)} failed")
    for f in c.failures:
        print(f"  FAILED {f}")
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
