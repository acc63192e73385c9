"""Create-if-absent never adopts: an object of a child's name that this FineTuneJob does not own gives a
``ChildConflict`` condition naming it, and is left untouched; once it is gone the job starts."""

from __future__ import annotations

import time

from kubetune_operator.main import OperatorHandle
from tests.operator.conftest import NAMESPACE, job_manifest
from tests.operator.helpers import condition, create, events, job_names, status, wait_phase
from tests.support.cluster import FakeCluster
from tests.support.kube import Client, wait_for

TIMEOUT = 40.0


def users_service(name: str) -> dict[str, object]:
    """A Service a user created for something else, under the name the job's Service would have."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def test_foreign_service_gives_child_conflict_and_stays_untouched(
    operator: OperatorHandle, client: Client, controller: FakeCluster
) -> None:
    before = client.create("v1", "services", NAMESPACE, users_service("t-taken"))
    create(client, job_manifest("t-taken"))
    wait_for(
        lambda: any(c["type"] == "ChildConflict" for c in status(client, "t-taken").get("conditions", [])),
        TIMEOUT,
        what="ChildConflict",
    )
    st = status(client, "t-taken")
    conflict = condition(st, "ChildConflict")
    assert (conflict["status"], conflict["reason"]) == ("True", "NameTaken")
    assert f"Service {NAMESPACE}/t-taken" in conflict["message"]
    assert "nothing was adopted" in conflict["message"]
    assert st["phase"] == "Pending"
    assert ("NameTaken", conflict["message"]) in events(client, "t-taken")
    time.sleep(1.5)  # reconciles come and go: still nothing touches it
    after = client.get("v1", "services", NAMESPACE, "t-taken")
    assert after == before, "the user's Service is exactly as it was"
    assert job_names(client, "t-taken") == [], "no attempt runs without its rendezvous Service"
    # The user removes their Service: the job creates its own and starts.
    client.delete("v1", "services", NAMESPACE, "t-taken")
    st = wait_phase(client, "t-taken", "Running", TIMEOUT)
    assert condition(st, "ChildConflict")["status"] == "False"
    service = client.get("v1", "services", NAMESPACE, "t-taken")
    assert service["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
