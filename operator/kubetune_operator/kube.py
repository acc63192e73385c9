"""A small async Kubernetes REST client (aiohttp) for the few calls the operator makes.

Built from the same :class:`kopf.ConnectionInfo` kopf logged in with, so the
operator has one identity.  Label selectors are sent to the server and applied
again here (cheap, and correct against servers that ignore them).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from kubetune_trainer.spec import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """An API call failed; ``status`` is the HTTP status (0: no response)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        """Worth retrying: conflicts, throttling, server errors, no response."""
        return self.status in (0, 409, 429) or self.status >= 500


@dataclass(frozen=True)
class Resource:
    """A Kubernetes resource type: ``('batch', 'v1', 'jobs')``; core group is ``''``."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        """The URL path of the collection or of one object."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace)}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name)}"
        if subresource:
            base += f"/{subresource}"
        return base


CONFIG_MAPS = Resource("", "v1", "configmaps")
SERVICES = Resource("", "v1", "services")
PODS = Resource("", "v1", "pods")
EVENTS = Resource("", "v1", "events")
JOBS = Resource("batch", "v1", "jobs")
NODES = Resource("", "v1", "nodes", namespaced=False)
FINETUNEJOBS = Resource(GROUP, VERSION, PLURAL)
KINDS = {"ConfigMap": CONFIG_MAPS, "Service": SERVICES, "Job": JOBS}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    """The resource of a manifest the builders produce."""
    kind = obj.get("kind")
    if kind in KINDS:
        return KINDS[str(kind)]
    raise ValueError(f"unsupported kind {kind!r}")


def matches(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    """Whether ``obj``'s labels contain every ``selector`` pair."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


class KubeApi:
    """GET/LIST/CREATE/PATCH/DELETE against one API server."""

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        scheme: str | None = None,
        ca_path: str | None = None,
        ca_data: str | bytes | None = None,
        insecure: bool = False,
        certificate_path: str | None = None,
        private_key_path: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.server = server.rstrip("/")
        self._headers = {"Accept": "application/json", "User-Agent": "kubetune-operator"}
        if token:
            self._headers["Authorization"] = f"{scheme or 'Bearer'} {token}"
        self._ssl: ssl.SSLContext | bool = True
        if self.server.startswith("https://"):
            if insecure:
                self._ssl = False
            else:
                context = ssl.create_default_context(cafile=ca_path)
                if ca_data:
                    text = ca_data.decode() if isinstance(ca_data, bytes) else ca_data
                    context.load_verify_locations(cadata=text)
                if certificate_path:
                    context.load_cert_chain(certificate_path, private_key_path)
                self._ssl = context
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._plain: aiohttp.ClientSession | None = None  # for pods: never carries the operator's token

    async def close(self) -> None:
        """Close the HTTP sessions."""
        for session in (self._session, self._plain):
            if session is not None:
                await session.close()
        self._session = self._plain = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        try:
            async with self._client().request(
                method, self.server + path, data=data, params=params, headers=headers, ssl=self._ssl
            ) as response:
                text = await response.text()
                payload: Any = json.loads(text) if text.strip().startswith(("{", "[")) else text
                return response.status, payload
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiError(0, type(error).__name__, str(error)) from error

    @staticmethod
    def _raise(status: int, payload: Any) -> None:
        if isinstance(payload, dict):
            raise ApiError(status, str(payload.get("reason", "")), str(payload.get("message", "")))
        raise ApiError(status, "", str(payload)[:200])

    async def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        status, payload = await self._request("GET", resource.path(namespace, name))
        if status == 404:
            return None
        if status >= 400:
            self._raise(status, payload)
        return dict(payload)

    async def list(
        self, resource: Resource, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Objects of ``resource`` in ``namespace`` whose labels match ``selector``."""
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in selector.items())} if selector else None
        status, payload = await self._request("GET", resource.path(namespace), params=params)
        if status >= 400:
            self._raise(status, payload)
        items = payload.get("items") or [] if isinstance(payload, dict) else []
        return [dict(item) for item in items if not selector or matches(item, selector)]

    async def create(self, resource: Resource, namespace: str | None, body: Mapping[str, Any]) -> bool:
        """Create ``body``; False when an object of that name already exists (idempotent)."""
        status, payload = await self._request("POST", resource.path(namespace), body=body)
        if status == 409:
            return False
        if status >= 400:
            self._raise(status, payload)
        return True

    async def patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        body: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any] | None:
        """JSON merge patch; None when the object is gone."""
        path = resource.path(namespace, name, subresource)
        status, payload = await self._request("PATCH", path, body=body, content_type=MERGE_PATCH)
        if status == 404:
            return None
        if status >= 400:
            self._raise(status, payload)
        return dict(payload) if isinstance(payload, dict) else None

    async def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        *,
        propagation: str = "Background",
        grace_period_seconds: int | None = None,
    ) -> bool:
        """Delete with ``propagationPolicy`` (and ``gracePeriodSeconds``: 0 force-deletes a pod);
        False when it was already gone."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = grace_period_seconds
        status, payload = await self._request("DELETE", resource.path(namespace, name), body=body)
        if status == 404:
            return False
        if status >= 400:
            self._raise(status, payload)
        return True

    async def fetch_text(self, url: str, timeout: float) -> str | None:
        """GET a plain-text URL (a pod's metrics endpoint); None on any failure."""
        if self._plain is None or self._plain.closed:
            self._plain = aiohttp.ClientSession(headers={"User-Agent": "kubetune-operator"})
        try:
            async with self._plain.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return await response.text() if response.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
