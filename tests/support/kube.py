"""A Kubernetes API emulator for operator tests: kmock's emulator plus the semantics kopf and
the operator rely on, served over real HTTP from a background thread.

kmock 0.8 merges JSON naively.  :class:`Emulator` adds what these tests need:
uid, resourceVersion, generation and creationTimestamp; generateName; JSON merge
patch (null deletes) and JSON patch; a separate ``status`` subresource (the main
endpoint ignores ``status`` and ``/status`` changes only ``status``, as for CRDs
and built-in workloads); finalizers with deletionTimestamp; graceful pod deletion
(a pod bound to a node gets ``deletionTimestamp = now + grace`` and goes only when
its kubelet confirms, or at once with ``gracePeriodSeconds: 0``); owner-reference
garbage collection (dependents go shortly after their owner, like the background
GC; pods gracefully); label selectors on lists and watches; the authorization check
of the OwnerReferencesPermissionEnforcement admission plugin (``blockOwnerDeletion``
needs ``update`` on the owner's ``finalizers``); and a log of every API call as
``(apiGroup, resource[/subresource], verb, namespace)`` plus its label selector,
for RBAC and watch audits.

The nodes, the Job controller, the scheduler and the kubelets are
:class:`tests.support.cluster.FakeCluster`.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import apps, enums
from kmock._internal.k8s import KubernetesObjectConflictError, KubernetesObjectNotFoundError

from kubetune_operator.crd import custom_resource_definition

TEST_AGENT = "kubetune-tests"
STATUS_SUBRESOURCE = {("kubetune.io", "finetunejobs"), ("batch", "jobs"), ("", "pods"), ("", "nodes")}
DEFAULT_GRACE_SECONDS = 30  # a pod's terminationGracePeriodSeconds when it names none
# Owner kinds whose finalizers subresource OwnerReferencesPermissionEnforcement checks.
OWNER_RESOURCES = {"FineTuneJob": ("kubetune.io", "finetunejobs"), "Job": ("batch", "jobs")}
GENERATION = {("kubetune.io", "finetunejobs"), ("batch", "jobs")}

Call = tuple[str, str, str, str]  # (apiGroup, resource[/subresource], verb, namespace or "")

RESOURCES: dict[str, kmock.ResourceInfo] = {
    "kubetune.io/v1alpha1/finetunejobs": kmock.ResourceInfo(
        kind="FineTuneJob",
        namespaced=True,
        shortnames={"ftj"},
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
    ),
    "batch/v1/jobs": kmock.ResourceInfo(
        kind="Job",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
    ),
    "v1/pods": kmock.ResourceInfo(
        kind="Pod",
        namespaced=True,
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
    ),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs={"get", "list", "create", "delete"}),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs={"get", "list", "create", "delete"}),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"get", "list", "create", "patch"}),
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"get", "list", "watch"}),
    "v1/nodes": kmock.ResourceInfo(
        kind="Node",
        namespaced=False,
        subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    ),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", namespaced=True, verbs={"get", "list", "create", "delete"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"get", "list", "watch"}
    ),
    "kopf.dev/v1/clusterkopfpeerings": kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs={"get", "list", "watch", "patch"}
    ),
    "kopf.dev/v1/kopfpeerings": kmock.ResourceInfo(
        kind="KopfPeering", namespaced=True, verbs={"get", "list", "watch", "patch"}
    ),
}


def _now(after: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=after)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_selector(text: str) -> dict[str, str]:
    """``a=b,c==d`` → ``{a: b, c: d}`` (equality terms: all the operator and kopf send)."""
    selector: dict[str, str] = {}
    for term in text.split(","):
        if "=" in term:
            key, _, value = term.partition("=")
            selector[key.strip().rstrip("=").rstrip("!")] = value.strip().lstrip("=")
    return selector


def labels_match(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    """Whether ``obj``'s labels contain every pair of ``selector``."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null removes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, operations: Iterable[Mapping[str, Any]]) -> Any:
    """RFC 6902 JSON patch (add, replace, remove, test) — what kopf sends for some changes."""
    doc = copy.deepcopy(target)
    for op in operations:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op["path"]).split("/")[1:]]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else ""
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise KubernetesObjectConflictError(status=422, reason="Invalid", message="json patch test failed")
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last, None)
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
    return doc


@dataclass(frozen=True)
class RecordedCall:
    """One API request as the RBAC audit sees it."""

    group: str
    resource: str
    verb: str
    namespace: str
    agent: str
    selector: str = ""  # the labelSelector of a list or watch

    @property
    def call(self) -> Call:
        return (self.group, self.resource, self.verb, self.namespace)


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with uid/resourceVersion/generateName/status/finalizers/GC and a call log."""

    gc_delay: float = 0.05

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.calls: list[RecordedCall] = []
        self.rv = 0
        self.fail_next: list[tuple[Callable[[RecordedCall], bool], int]] = []  # injected API errors
        for key, info in RESOURCES.items():
            self.resources[key] = info
        self._gc_tasks: set[asyncio.Task[None]] = set()
        self.store: dict[tuple[str, str], dict[tuple[str | None, str], dict[str, Any]]] = {}
        self._resources_seen: dict[tuple[str, str], Any] = {}
        self.created: list[tuple[tuple[str, str], str | None, str]] = []  # every successful create
        self.created_at: dict[tuple[tuple[str, str], str | None, str], float] = {}  # first create (monotonic)

    # ----------------------------------------------------------------- helpers

    def _get(self, resource: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
        found = self.store.get(self._gk(resource), {}).get((namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def _store(self, resource: Any, namespace: str | None, name: str, obj: dict[str, Any]) -> None:
        # Reads are served from this plain index (kmock's generic matching is too slow for
        # hundreds of objects); kmock's own array is kept in step for its watch streams.
        self.store.setdefault(self._gk(resource), {})[(namespace, name)] = obj
        self._objects[resource, namespace, name] = obj

    def _forget(self, resource: Any, namespace: str | None, name: str) -> None:
        self.store.get(self._gk(resource), {}).pop((namespace, name), None)
        del self._objects[resource, namespace, name]

    async def _publish(self, resource: Any, kind: str, obj: Mapping[str, Any]) -> None:
        await self._buses[resource].put({"type": kind, "object": copy.deepcopy(dict(obj))})

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)

    @staticmethod
    def _gk(resource: Any) -> tuple[str, str]:
        return (resource.group or "", resource.plural or "")

    def _verb(self, request: Any) -> str:
        action = request.action
        if action == enums.action.LIST:
            return "list"
        if action == enums.action.WATCH:
            return "watch"
        if action == enums.action.FETCH:
            return "get"
        if action == enums.action.CREATE:
            return "create"
        if action == enums.action.DELETE:
            return "delete" if request.name else "deletecollection"
        if action == enums.action.UPDATE:
            return "update" if str(request.method).upper().endswith("PUT") else "patch"
        return str(request.method).lower()

    # ----------------------------------------------------------------- request handling

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock cannot parse /api/v1/namespaces (it reads "namespaces" as a namespace prefix);
        # kopf lists and watches it when it serves selected namespaces.
        if raw_request.method == "GET" and raw_request.path.rstrip("/") == "/api/v1/namespaces":
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        watching = raw_request.query.get("watch", "").lower() in ("true", "1")
        agent = raw_request.headers.get("User-Agent", "")
        self.calls.append(RecordedCall("", "namespaces", "watch" if watching else "list", "", agent))
        items = [
            obj.raw
            for (resource, _ns, _name), obj in list(self._objects.items())
            if resource.plural == "namespaces" and not obj.deleted
        ]
        if not watching:
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "NamespaceList",
                    "metadata": {"resourceVersion": str(self.rv)},
                    "items": items,
                }
            )
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        # Namespaces never change in these tests: keep the stream open until the client's timeout.
        await asyncio.sleep(float(raw_request.query.get("timeoutSeconds", "300")))
        return response

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.resource is None or not request.resource.plural:  # discovery
            return await apps.RawHandler._handle(self, request)
        resource = request.resource
        self._resources_seen.setdefault(self._gk(resource), resource)
        if len(self._requests) > 2000:  # kmock keeps every request; the tests only need our call log
            del self._requests[:]
        plural = resource.plural + (f"/{request.subresource}" if request.subresource else "")
        agent = ""
        if request._raw_request is not None:
            agent = request._raw_request.headers.get("User-Agent", "")
        selector = str(request.params.get("labelSelector", ""))
        verb = self._verb(request)
        record = RecordedCall(resource.group or "", plural, verb, request.namespace or "", agent, selector)
        self.calls.append(record)
        if verb == "create" and isinstance(request.data, dict):
            self._check_owner_references(request.data, request.namespace or "", agent)
        for index, (predicate, status) in enumerate(self.fail_next):
            if predicate(record):
                del self.fail_next[index]
                return aiohttp.web.json_response(
                    {"kind": "Status", "code": status, "reason": "Injected", "message": "injected failure"},
                    status=status,
                )
        action = request.action
        try:
            if action == enums.action.FETCH and request.name and not request.subresource:
                found = self.store.get(self._gk(resource), {}).get((request.namespace, request.name))
                if found is None:
                    raise KubernetesObjectNotFoundError()
                return aiohttp.web.json_response(found)
            if action == enums.action.LIST:
                return aiohttp.web.json_response(self._list(request))
            if action == enums.action.CREATE:
                return await self._create(request)
            if action == enums.action.UPDATE and request.name:
                return await self._update(request)
            if action == enums.action.DELETE and request.name:
                return await self._delete(request)
        except (KubernetesObjectConflictError, KubernetesObjectNotFoundError) as error:
            return await self._render_error(error)
        return await apps.RawHandler._handle(self, request)

    def _check_owner_references(self, body: Mapping[str, Any], namespace: str, agent: str) -> None:
        """OwnerReferencesPermissionEnforcement: setting ``blockOwnerDeletion`` requires ``update`` on the
        owner's ``finalizers`` subresource; the check is recorded as the call the authorizer sees."""
        for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
            owner = OWNER_RESOURCES.get(str(ref.get("kind")))
            if ref.get("blockOwnerDeletion") and owner is not None:
                self.calls.append(RecordedCall(owner[0], f"{owner[1]}/finalizers", "update", namespace, agent))

    def _matching(self, request: Any) -> list[dict[str, Any]]:
        selector = parse_selector(str(request.params.get("labelSelector", "")))
        return [
            obj
            for (namespace, _name), obj in self.store.get(self._gk(request.resource), {}).items()
            if (request.namespace is None or namespace == request.namespace) and labels_match(obj, selector)
        ]

    def _list(self, request: Any) -> dict[str, Any]:
        items = self._matching(request)
        return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    async def _serve_watch(self, request: Any) -> Any:
        """A watch served from the plain index, honouring the namespace and the label selector (kmock's own
        streams every object of the resource and matches them slowly)."""
        yield b""
        selector = parse_selector(str(request.params.get("labelSelector", "")))
        bus = self._buses[request.resource]
        async with self._lock:  # writers publish under the lock: nothing falls between snapshot and mark
            marker = await bus.mark()
            snapshot = [copy.deepcopy(obj) for obj in self._matching(request)]
        for obj in snapshot:
            yield {"type": "ADDED", "object": obj}
        async for event in bus.stream(since=marker):
            obj = event.get("object") or {}
            namespace = (obj.get("metadata") or {}).get("namespace")
            if (request.namespace is None or namespace == request.namespace) and labels_match(obj, selector):
                yield event

    def preload(self, group: str, plural: str, objects: Iterable[dict[str, Any]]) -> None:
        """Put many objects into the store directly (no HTTP, no events), e.g. 10,000 unrelated pods.
        Call it before anything watches that resource."""
        resource = self._resources_seen.get((group, plural))
        if resource is None:
            raise KeyError(f"{group}/{plural} was not requested yet: create one object through the API first")
        for obj in objects:
            metadata = obj.setdefault("metadata", {})
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", _now())
            self._bump(obj)
            self._store(resource, metadata.get("namespace"), metadata["name"], obj)

    async def _create(self, request: Any) -> aiohttp.web.StreamResponse:
        resource = request.resource
        obj = copy.deepcopy(request.data) if isinstance(request.data, dict) else {}
        metadata = obj.setdefault("metadata", {})
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)
        namespace = request.namespace or metadata.get("namespace")
        if namespace:
            metadata["namespace"] = namespace
        name = metadata.get("name")
        async with self._lock:
            if self._get(resource, namespace, name) is not None:
                raise KubernetesObjectConflictError(message=f"{resource.plural} {name!r} already exists")
            metadata["uid"] = str(uuid.uuid4())
            metadata["creationTimestamp"] = _now()
            if self._gk(resource) in GENERATION:
                metadata["generation"] = 1
            if self._gk(resource) in STATUS_SUBRESOURCE and self._gk(resource) != ("", "pods"):
                obj.pop("status", None)
            self._bump(obj)
            self._store(resource, namespace, name, obj)
            self.created.append((self._gk(resource), namespace, name))
            self.created_at.setdefault((self._gk(resource), namespace, name), time.monotonic())
            await self._publish(resource, "ADDED", obj)
        return aiohttp.web.json_response(obj, status=201)

    async def _update(self, request: Any) -> aiohttp.web.StreamResponse:
        resource = request.resource
        namespace, name = request.namespace, request.name
        async with self._lock:
            current = self._get(resource, namespace, name)
            if current is None:
                raise KubernetesObjectNotFoundError()
            content_type = ""
            if request._raw_request is not None:
                content_type = request._raw_request.headers.get("Content-Type", "")
            data = request.data
            if isinstance(data, list) or "json-patch" in content_type:
                new = json_patch(current, data or [])
            elif str(request.method).upper().endswith("PUT"):
                new = copy.deepcopy(data)
                new.setdefault("metadata", {}).update(
                    {k: current["metadata"][k] for k in ("uid", "creationTimestamp") if k in current["metadata"]}
                )
            else:
                new = merge_patch(current, data or {})
            has_status = self._gk(resource) in STATUS_SUBRESOURCE
            if request.subresource == "status":
                new = (
                    {**current, "status": new.get("status")}
                    if new.get("status") is not None
                    else {k: v for k, v in current.items() if k != "status"}
                )
            elif has_status:
                if "status" in current:
                    new["status"] = current["status"]
                else:
                    new.pop("status", None)
            for key in ("uid", "creationTimestamp"):
                if key in current.get("metadata", {}):
                    new.setdefault("metadata", {})[key] = current["metadata"][key]
            if self._gk(resource) in GENERATION and new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
            if current.get("metadata", {}).get("deletionTimestamp"):
                new["metadata"]["deletionTimestamp"] = current["metadata"]["deletionTimestamp"]
            self._bump(new)
            meta = new["metadata"]
            # The last finalizer went: the object goes (a pod only once its grace period is over: 0).
            if (
                meta.get("deletionTimestamp")
                and not meta.get("finalizers")
                and int(meta.get("deletionGracePeriodSeconds") or 0) == 0
            ):
                await self._remove(resource, namespace, name, new, propagation="Background")
            else:
                self._store(resource, namespace, name, new)
                await self._publish(resource, "MODIFIED", new)
        return aiohttp.web.json_response(new)

    async def _delete(self, request: Any) -> aiohttp.web.StreamResponse:
        resource = request.resource
        namespace, name = request.namespace, request.name
        options = request.data if isinstance(request.data, dict) else {}
        propagation = options.get("propagationPolicy") or request.params.get("propagationPolicy") or "Background"
        grace = options.get("gracePeriodSeconds", request.params.get("gracePeriodSeconds"))
        async with self._lock:
            current = self._get(resource, namespace, name)
            if current is None:
                raise KubernetesObjectNotFoundError()
            meta = current["metadata"]
            if self._gk(resource) == ("", "pods"):
                current = await self._delete_pod(resource, current, None if grace is None else int(grace))
            elif meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = _now()
                    self._bump(current)
                    self._store(resource, namespace, name, current)
                    await self._publish(resource, "MODIFIED", current)
            else:
                await self._remove(resource, namespace, name, current, propagation=propagation)
        return aiohttp.web.json_response(current)

    async def _delete_pod(self, resource: Any, pod: dict[str, Any], grace: int | None) -> dict[str, Any]:
        """Graceful deletion (lock held): a pod on a node stays, with ``deletionTimestamp`` at the end of its
        grace period, until its kubelet confirms it is gone (``gracePeriodSeconds: 0``); a pod not bound to a
        node, or a forced deletion, goes at once."""
        meta = pod["metadata"]
        if grace is None:
            grace = int((pod.get("spec") or {}).get("terminationGracePeriodSeconds") or DEFAULT_GRACE_SECONDS)
        if not (pod.get("spec") or {}).get("nodeName"):
            grace = 0
        if grace <= 0 and not meta.get("finalizers"):
            await self._remove(resource, meta.get("namespace"), meta["name"], pod, propagation="Background")
            return pod
        deadline = _now(grace)
        if meta.get("deletionTimestamp") and meta["deletionTimestamp"] <= deadline and grace > 0:
            return pod  # a deletion in progress is only ever shortened
        meta["deletionTimestamp"] = min(deadline, meta.get("deletionTimestamp") or deadline)
        meta["deletionGracePeriodSeconds"] = grace  # 0: gone once the finalizers are
        self._bump(pod)
        self._store(resource, meta.get("namespace"), meta["name"], pod)
        await self._publish(resource, "MODIFIED", pod)
        return pod

    async def _remove(
        self, resource: Any, namespace: str | None, name: str, obj: dict[str, Any], *, propagation: str
    ) -> None:
        """Physically delete (lock held) and schedule the dependents' garbage collection."""
        self._forget(resource, namespace, name)
        await self._publish(resource, "DELETED", obj)
        uid = obj.get("metadata", {}).get("uid")
        if uid and propagation != "Orphan":
            task = asyncio.get_running_loop().create_task(self._collect(uid))
            self._gc_tasks.add(task)
            task.add_done_callback(self._gc_tasks.discard)

    async def _collect(self, owner_uid: str) -> None:
        await asyncio.sleep(self.gc_delay)
        async with self._lock:
            dependents = [
                (self._resources_seen[gk], namespace, name, copy.deepcopy(obj))
                for gk, objects in self.store.items()
                if gk in self._resources_seen
                for (namespace, name), obj in list(objects.items())
                if any(ref.get("uid") == owner_uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])
            ]
            for resource, namespace, name, obj in dependents:
                if self._gk(resource) == ("", "pods"):
                    await self._delete_pod(resource, obj, None)
                elif obj["metadata"].get("finalizers"):
                    obj["metadata"].setdefault("deletionTimestamp", _now())
                    self._bump(obj)
                    self._store(resource, namespace, name, obj)
                    await self._publish(resource, "MODIFIED", obj)
                else:
                    await self._remove(resource, namespace, name, obj, propagation="Background")

    # ----------------------------------------------------------------- inspection

    def operator_calls(self) -> set[Call]:
        """Every call made by anything but the tests themselves."""
        return {c.call for c in self.calls if not c.agent.startswith(TEST_AGENT)}


class EmulatorServer:
    """The emulator on a loopback HTTP port, served from a background thread."""

    def __init__(self, namespaces: Iterable[str] = ("default",), *, peering: bool = True) -> None:
        self.emulator = Emulator()
        self._namespaces = list(namespaces)
        self._peering = peering
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self.url = ""

    def __enter__(self) -> EmulatorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("emulator did not start")
        self.seed()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._started.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def seed(self) -> None:
        """Namespaces, the FineTuneJob CRD and kopf's peering object."""
        client = self.client()
        # kmock cannot parse POST /api/v1/namespaces (it reads "namespaces" as a namespace prefix).
        for namespace in self._namespaces:
            self.emulator.objects["v1/namespaces", None, namespace] = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace, "uid": str(uuid.uuid4())},
            }
        client.create("apiextensions.k8s.io/v1", "customresourcedefinitions", None, custom_resource_definition())
        if self._peering:
            client.create("kopf.dev/v1", "clusterkopfpeerings", None, {"metadata": {"name": "kubetune"}})
            for namespace in self._namespaces:
                client.create("kopf.dev/v1", "kopfpeerings", namespace, {"metadata": {"name": "kubetune"}})

    def client(self) -> Client:
        return Client(self.url)

    def write_kubeconfig(self, path: Any) -> str:
        """A kubeconfig pointing at this emulator (for operators in subprocesses)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tests", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tests"}}],
            "current-context": "emulator",
        }
        text = json.dumps(config)
        with open(path, "w") as handle:
            handle.write(text)
        return str(path)


class Client:
    """A tiny synchronous client the tests use (marked with its own User-Agent)."""

    def __init__(self, url: str) -> None:
        self.url = url

    @staticmethod
    def path(api_version: str, plural: str, namespace: str | None, name: str | None = None, sub: str = "") -> str:
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 (loopback)
        request.add_header("User-Agent", TEST_AGENT)
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def create(self, api_version: str, plural: str, namespace: str | None, body: Mapping[str, Any]) -> Any:
        try:
            return self.request("POST", self.path(api_version, plural, namespace), dict(body))
        except urllib.error.HTTPError as error:
            if error.code == 409:
                return None
            raise

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Any:
        return self.request("GET", self.path(api_version, plural, namespace, name))

    def list(
        self, api_version: str, plural: str, namespace: str | None = None, selector: str = ""
    ) -> list[dict[str, Any]]:
        query = f"?labelSelector={urllib.parse.quote(selector)}" if selector else ""
        result = self.request("GET", self.path(api_version, plural, namespace) + query)
        return list((result or {}).get("items") or [])

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, body: Any, sub: str = "") -> Any:
        return self.request(
            "PATCH", self.path(api_version, plural, namespace, name, sub), body, "application/merge-patch+json"
        )

    def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
        grace_period_seconds: int | None = None,
    ) -> Any:
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = grace_period_seconds
        return self.request("DELETE", self.path(api_version, plural, namespace, name), body)

    # FineTuneJob shortcuts
    def ftj(self, namespace: str, name: str) -> Any:
        return self.get("kubetune.io/v1alpha1", "finetunejobs", namespace, name)

    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.list("batch/v1", "jobs", namespace)

    def pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.list("v1", "pods", namespace)


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last value: {last!r}")
