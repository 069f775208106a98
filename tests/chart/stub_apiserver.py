"""A tiny in-memory stand-in for the Kubernetes API server, for rendering the chart.

helm-sdkpy exposes no `helm template` and no dry-run: its Install action always talks to a
cluster. This stub answers just enough of the API on 127.0.0.1 for a real Helm install to
run end to end: /version; discovery (which decides .Capabilities.APIVersions, so the
ServiceMonitor and KEDA templates render only when their groups are advertised); an empty
OpenAPI v2 document (client-side validation then has no schema and skips); and
create/get/list/watch (watch-list included)/delete of namespaced objects kept in a dict.
Jobs are stored as already complete, so pre-install hooks "succeed" at once. Nothing is
scheduled or run, and no object is validated here: that is kubernetes-validate's job.

Helm keeps the release itself in memory (HELM_DRIVER=memory); the rendered manifests are
read from the release Install returns.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

KUBE_VERSION = ("1", "30", "v1.30.0")

# group/version -> [(plural, kind, namespaced)]
BUILTIN = {
    "v1": [
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("pods", "Pod", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("deployments", "Deployment", True), ("replicasets", "ReplicaSet", True)],
    "batch/v1": [("jobs", "Job", True)],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("ingresses", "Ingress", True)],
}
# Optional CRD-backed APIs, advertised only when asked for.
CRDS = {
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True)],
    "keda.sh/v1alpha1": [
        ("scaledobjects", "ScaledObject", True),
        ("triggerauthentications", "TriggerAuthentication", True),
    ],
}
OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


class _QuietServer(ThreadingHTTPServer):
    """Clients drop watches whenever they like; that is not worth a traceback."""

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class StubApiServer:
    """Serves the stub API in a background thread; use as a context manager."""

    def __init__(self, extra_group_versions: list[str] = ()):
        self.apis = dict(BUILTIN)
        for gv in extra_group_versions:
            self.apis[gv] = CRDS[gv]
        self.objects: dict[tuple[str, str, str, str], dict] = {}
        self.lock = threading.Lock()
        self.rv = 1
        self.events: list[tuple[int, str, tuple, dict]] = []
        self.requests: list[str] = []
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self) -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: stub\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: stub\n  user:\n    token: stub\n"
            "contexts:\n- name: stub\n  context:\n    cluster: stub\n    user: stub\n"
            "    namespace: default\ncurrent-context: stub\n"
        )

    def __enter__(self) -> StubApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- request handling -------------------------------------------------------------

    def _resource(self, gv: str, plural: str):
        for p, kind, namespaced in self.apis.get(gv, []):
            if p == plural:
                return kind, namespaced
        return None

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure" if code >= 400 else "Success",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                return json.loads(raw or b"{}")

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                parts = [p for p in url.path.split("/") if p]
                stub.requests.append(f"{method} {self.path}")
                if url.path == "/version":
                    major, minor, git = KUBE_VERSION
                    return self._send(
                        200,
                        {"major": major, "minor": minor, "gitVersion": git, "platform": "linux/amd64"},
                    )
                if url.path == "/openapi/v2":
                    # An empty OpenAPI document (an empty protobuf message): client-side
                    # schema validation finds no schema for any kind and skips it, so the
                    # only checks are Helm's own and kubernetes-validate's afterwards.
                    self.send_response(200)
                    self.send_header("Content-Type", OPENAPI_V2_PROTOBUF)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if url.path == "/api":
                    return self._send(200, {"kind": "APIVersions", "versions": ["v1"]})
                if url.path == "/apis":
                    groups = {}
                    for gv in stub.apis:
                        if "/" in gv:
                            g, v = gv.split("/")
                            groups.setdefault(g, []).append({"groupVersion": gv, "version": v})
                    return self._send(
                        200,
                        {
                            "kind": "APIGroupList",
                            "apiVersion": "v1",
                            "groups": [
                                {"name": g, "versions": vs, "preferredVersion": vs[0]}
                                for g, vs in groups.items()
                            ],
                        },
                    )
                # /api/v1/... or /apis/<group>/<version>/...
                if parts[:1] == ["api"] and len(parts) >= 2:
                    gv, rest = parts[1], parts[2:]
                elif parts[:1] == ["apis"] and len(parts) >= 3:
                    gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
                else:
                    return self._status(404, "NotFound", f"no route {url.path}")
                if gv not in stub.apis:
                    return self._status(404, "NotFound", f"no API {gv}")
                if not rest:
                    return self._send(
                        200,
                        {
                            "kind": "APIResourceList",
                            "apiVersion": "v1",
                            "groupVersion": gv,
                            "resources": [
                                {
                                    "name": p,
                                    "singularName": k.lower(),
                                    "namespaced": ns,
                                    "kind": k,
                                    "verbs": VERBS,
                                }
                                for p, k, ns in stub.apis[gv]
                            ],
                        },
                    )
                namespace = ""
                if rest[0] == "namespaces" and len(rest) >= 3:
                    namespace, rest = rest[1], rest[2:]
                plural, name = rest[0], (rest[1] if len(rest) > 1 else "")
                found = stub._resource(gv, plural)
                if not found:
                    return self._status(404, "NotFound", f"no resource {gv}/{plural}")
                kind, _ = found
                key = (gv, plural, namespace, name)
                if method == "GET" and not name:
                    if query.get("watch", ["false"])[0] in ("true", "1"):
                        return self._watch(gv, plural, kind, namespace, query)
                    return self._list(gv, plural, kind, namespace, query)
                if method == "GET":
                    with stub.lock:
                        obj = stub.objects.get(key)
                    if obj is None:
                        return self._status(404, "NotFound", f'{plural} "{name}" not found')
                    return self._send(200, obj)
                if method == "POST":
                    obj = self._body()
                    name = obj.get("metadata", {}).get("name", "")
                    key = (gv, plural, namespace, name)
                    with stub.lock:
                        if key in stub.objects:
                            return self._status(409, "AlreadyExists", f'{plural} "{name}" already exists')
                        stub.objects[key] = stub._stamp(obj, kind, namespace)
                        stub._event("ADDED", key, stub.objects[key])
                        return self._send(201, stub.objects[key])
                if method in ("PUT", "PATCH"):
                    with stub.lock:
                        if key not in stub.objects:
                            return self._status(404, "NotFound", f'{plural} "{name}" not found')
                        if method == "PUT":
                            stub.objects[key] = stub._stamp(self._body(), kind, namespace)
                            stub._event("MODIFIED", key, stub.objects[key])
                        else:  # patches are accepted and ignored
                            self._body()
                        return self._send(200, stub.objects[key])
                if method == "DELETE":
                    self._body()
                    with stub.lock:
                        obj = stub.objects.pop(key, None)
                        if obj is not None:
                            stub.rv += 1
                            stub._event("DELETED", key, obj)
                    if obj is None:
                        return self._status(404, "NotFound", f'{plural} "{name}" not found')
                    return self._status(200, "", "deleted")
                return self._status(405, "MethodNotAllowed", method)

            def _list(self, gv, plural, kind, namespace, query) -> None:
                match = self._matcher(gv, plural, namespace, query)
                with stub.lock:
                    items = [o for k, o in stub.objects.items() if match(k)]
                    rv = str(stub.rv)
                self._send(
                    200,
                    {
                        "kind": f"{kind}List",
                        "apiVersion": gv,
                        "metadata": {"resourceVersion": rv},
                        "items": items,
                    },
                )

            def _watch(self, gv, plural, kind, namespace, query) -> None:
                # Watch-list (sendInitialEvents) first replays what exists and marks the end
                # with a bookmark; a plain watch streams what changed after resourceVersion.
                # The stream ends after a few seconds; clients simply watch again.
                match = self._matcher(gv, plural, namespace, query)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def emit(kind_, obj):
                    data = json.dumps({"type": kind_, "object": obj}).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()

                with stub.lock:
                    since = stub.rv
                    initial = [o for k, o in stub.objects.items() if match(k)]
                if query.get("sendInitialEvents", ["false"])[0] == "true":
                    for obj in initial:
                        emit("ADDED", obj)
                    emit(
                        "BOOKMARK",
                        {
                            "kind": kind,
                            "apiVersion": gv,
                            "metadata": {
                                "resourceVersion": str(since),
                                "annotations": {"k8s.io/initial-events-end": "true"},
                            },
                        },
                    )
                else:
                    try:
                        since = int(query.get("resourceVersion", [since])[0] or since)
                    except ValueError:
                        pass
                deadline = time.monotonic() + min(3.0, float(query.get("timeoutSeconds", ["3"])[0]))
                while time.monotonic() < deadline:
                    with stub.lock:
                        events = [e for e in stub.events if e[0] > since and match(e[2])]
                    for rv, type_, _, obj in events:
                        emit(type_, obj)
                        since = rv
                    time.sleep(0.05)
                self.wfile.write(b"0\r\n\r\n")

            def _matcher(self, gv, plural, namespace, query):
                field = query.get("fieldSelector", [""])[0]
                want = field.split("=", 1)[1] if field.startswith("metadata.name=") else None

                def match(key):
                    g, p, ns, n = key
                    return (
                        g == gv and p == plural and (not namespace or ns == namespace)
                        and (want is None or n == want)
                    )

                return match

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

            def do_PATCH(self):
                self._route("PATCH")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler

    def _event(self, type_: str, key: tuple, obj: dict) -> None:
        self.events.append((self.rv, type_, key, obj))

    def _stamp(self, obj: dict, kind: str, namespace: str) -> dict:
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta["resourceVersion"] = str(self.rv)
        if namespace:
            meta.setdefault("namespace", namespace)
        if kind == "Job":
            obj["status"] = {
                "succeeded": 1,
                "startTime": "2026-01-01T00:00:00Z",
                "completionTime": "2026-01-01T00:00:01Z",
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True"},
                    {"type": "Complete", "status": "True"},
                ],
            }
        return obj
