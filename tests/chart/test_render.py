"""The chart renders with Helm's own engine for every scenario in charts/kubetune/ci, lints clean, and every
object validates against the Kubernetes 1.30 and the newest supported schemas."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support import helm

SCENARIOS = helm.scenarios()
KUBE_VERSIONS = ("1.30", kubernetes_validate.latest_version())
#: Kinds whose schema kubernetes-validate does not ship (CRDs of other projects): checked structurally below.
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ClusterKopfPeering", "KopfPeering"}
REQUIRED_SCENARIOS = {"default", "namespaced", "ha", "monitoring", "networkpolicy"}


def test_required_scenarios_exist() -> None:
    assert set(SCENARIOS) >= REQUIRED_SCENARIOS, f"charts/kubetune/ci lacks {REQUIRED_SCENARIOS - set(SCENARIOS)}"


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, helm.render(SCENARIOS[request.param])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_is_clean(scenario: str) -> None:
    report = helm.lint(SCENARIOS[scenario])
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == [], serious


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_validates(rendered: tuple[str, list[dict[str, Any]]], version: str) -> None:
    scenario, objects = rendered
    validated = 0
    for obj in objects:
        if obj["kind"] in FOREIGN_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        validated += 1
    assert validated >= 5, f"{scenario}: only {validated} objects validated"


def test_unknown_kinds_are_only_the_foreign_crds(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["kind"] in FOREIGN_KINDS, f"{obj['kind']} has no schema and is not a known CRD kind"


def test_chart_crds_validate_and_peerings_match_their_crd_schema() -> None:
    crds = helm.chart_crds()
    for crd in crds:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(crd, version, strict=True)
    names = {crd["metadata"]["name"] for crd in crds}
    assert {"finetunejobs.kubetune.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= names
    by_kind = {crd["spec"]["names"]["kind"]: crd for crd in crds}
    for scenario in ("default", "namespaced"):
        for obj in helm.render(SCENARIOS[scenario]):
            if obj["kind"] in ("ClusterKopfPeering", "KopfPeering"):
                crd = by_kind[obj["kind"]]
                assert obj["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
                assert ("namespace" in obj["metadata"]) == (crd["spec"]["scope"] == "Namespaced")
                jsonschema.validate(obj, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_chart_crd_is_identical_to_the_generated_crd() -> None:
    top = (helm.REPO / "crds" / "kubetune.io_finetunejobs.yaml").read_text()
    chart = (helm.CHART_DIR / "crds" / "kubetune.io_finetunejobs.yaml").read_text()
    assert chart == top, "charts/kubetune/crds differs from crds/: cp crds/*.yaml charts/kubetune/crds/"


def test_schema_forbids_additional_properties_everywhere() -> None:
    schema = json.loads((helm.CHART_DIR / "values.schema.json").read_text())
    loose: list[str] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" and not node.get("x-kubetune-opaque"):
            extra = node.get("additionalProperties", True)
            # A typed map (labels, annotations, resource quantities) is closed by its value schema.
            if extra is True or (extra is not False and not isinstance(extra, dict)):
                loose.append(path or "/")
        for key, child in node.items():
            if isinstance(child, dict):
                walk(child, f"{path}/{key}")
            elif isinstance(child, list):
                for i, item in enumerate(child):
                    walk(item, f"{path}/{key}/{i}")

    walk(schema, "")
    assert loose == []


def _closed_objects(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Values paths whose schema is an object with ``additionalProperties: false``."""
    paths = [prefix] if schema.get("additionalProperties") is False else []
    for key, child in schema.get("properties", {}).items():
        if child.get("type") == "object":
            paths += _closed_objects(child, (*prefix, key))
    return paths


CLOSED = _closed_objects(json.loads((helm.CHART_DIR / "values.schema.json").read_text()))


def test_every_values_mapping_is_closed_in_the_schema() -> None:
    assert len(CLOSED) >= 25
    assert ("monitoring", "podMonitor") in CLOSED
    assert ("networkPolicy", "objectStorage") in CLOSED


@pytest.mark.parametrize("path", CLOSED, ids=lambda p: ".".join(p) or "(top)")
def test_schema_rejects_an_unknown_key_at_every_level(path: tuple[str, ...]) -> None:
    values: dict[str, Any] = {}
    node = values
    for part in path:
        node = node.setdefault(part, {})
    node["notAKubetuneSetting"] = True
    with pytest.raises(helm_python.HelmError, match="notAKubetuneSetting"):
        helm.render(values)


def test_schema_rejects_misspelt_top_level_key_and_bad_values() -> None:
    for bad in (
        {"replicaCounts": 2},
        {"replicaCount": 0},
        {"image": {"pullPolicy": "Sometimes"}},
        {"watchNamespaces": ["Bad_Name"]},
        {"securityContext": {"allowPrivilegeEscalation": True, "capabilities": {"drop": ["ALL"]}}},
    ):
        with pytest.raises(helm_python.HelmError):
            helm.render(bad)


def test_single_replica_uses_recreate_and_ha_uses_peering() -> None:
    single = helm.one(helm.render(SCENARIOS["default"]), "Deployment")
    assert single["spec"]["replicas"] == 1
    assert single["spec"]["strategy"] == {"type": "Recreate"}
    ha_objects = helm.render(SCENARIOS["ha"])
    ha = helm.one(ha_objects, "Deployment")
    assert ha["spec"]["replicas"] == 2
    assert ha["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in ha["spec"]["template"]["spec"]["containers"][0]["env"]}
    peering = helm.one(ha_objects, "ClusterKopfPeering")
    assert env["KUBETUNE_PEERING_NAME"]["value"] == peering["metadata"]["name"]
    assert helm.one(ha_objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert "podAntiAffinity" in ha["spec"]["template"]["spec"]["affinity"]
    image = ha["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("ghcr.io/kubetune/kubetune-operator@sha256:")
    assert helm.find(helm.render(SCENARIOS["default"]), "PodDisruptionBudget") == []


def test_operator_settings_env_and_probes() -> None:
    objects = helm.render(SCENARIOS["namespaced"])
    deployment = helm.one(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_WATCH_NAMESPACES"] == "team-a,team-b"
    assert env["KUBETUNE_DEFAULT_CHECKPOINT_URI"] == "s3://kubetune-checkpoints/jobs"
    assert env["KUBETUNE_CHECKPOINT_ENDPOINT"] == "http://minio.storage:9000"
    assert env["KUBETUNE_CREDENTIALS_SECRET"] == "kubetune-s3"
    assert env["KUBETUNE_METRICS_PORT"] == "8080"
    assert env["KUBETUNE_HEALTH_PORT"] == "8081"
    assert env["KUBETUNE_PROGRESS_INTERVAL_SECONDS"] == "30"
    assert env["KUBETUNE_DEFAULT_IMAGE"].startswith("ghcr.io/kubetune/kubetune-trainer")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = helm.one(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_settings_env_is_what_the_operator_reads(scenario: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Deployment's env, set in a real environment, loads through the operator's own settings loader."""
    settings = pytest.importorskip("kubetune_operator.settings")
    values = SCENARIOS[scenario]
    container = helm.one(helm.render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for name in [n for n in os.environ if n.startswith("KUBETUNE_")]:
        monkeypatch.delenv(name)
    for env in container["env"]:
        assert env["name"].startswith("KUBETUNE_"), f"unexpected env {env['name']}"
        monkeypatch.setenv(env["name"], env["value"])
    loaded = settings.load_settings()
    assert loaded.metrics_port == 8080
    assert loaded.health_port == 8081
    assert loaded.watch_namespaces == list(values.get("watchNamespaces", []))
    assert loaded.peering_name == "kt-kubetune"
    operator = values.get("operator", {})
    assert loaded.default_checkpoint_uri == operator.get("defaultCheckpointUri")
    assert loaded.checkpoint_endpoint == operator.get("checkpointEndpoint")
    assert loaded.credentials_secret == operator.get("credentialsSecret")


def test_monitoring_objects() -> None:
    objects = helm.render(SCENARIOS["monitoring"])
    service_monitor = helm.one(objects, "ServiceMonitor")
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    endpoint = service_monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics"
    assert {"action": "replace", "targetLabel": "job", "replacement": "kubetune-operator"} in endpoint["relabelings"]
    service = helm.one(objects, "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()

    pod_monitor = helm.one(objects, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    pod_endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert pod_endpoint["port"] == "metrics"
    assert pod_endpoint["interval"] == "15s"
    relabel = {r["targetLabel"]: r for r in pod_endpoint["relabelings"]}
    assert relabel["job_name"]["sourceLabels"] == ["__meta_kubernetes_pod_label_kubetune_io_job_name"]
    assert relabel["namespace"]["sourceLabels"] == ["__meta_kubernetes_namespace"]
    assert relabel["job"]["replacement"] == "kubetune-trainer"

    rule = helm.one(objects, "PrometheusRule")
    rules_file = yaml.safe_load((helm.CHART_DIR / "rules" / "kubetune-alerts.yaml").read_text())
    assert rule["spec"] == rules_file, "the PrometheusRule must carry exactly the plain rules file"

    dashboards = helm.find(objects, "ConfigMap")
    assert len(dashboards) == 2
    titles = set()
    for config_map in dashboards:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == "monitoring"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "kubetune"}
        ((key, text),) = config_map["data"].items()
        committed = (helm.CHART_DIR / "dashboards" / key).read_text()
        assert json.loads(text) == json.loads(committed)
        titles.add(json.loads(text)["title"])
    assert titles == {"kubetune / Overview", "kubetune / Training"}


def test_monitoring_objects_are_off_by_default() -> None:
    kinds = {o["kind"] for o in helm.render(SCENARIOS["default"])}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy", "ConfigMap"}


def test_network_policy_for_trainer_pods() -> None:
    objects = helm.render(SCENARIOS["networkpolicy"])
    (policy,) = helm.find(objects, "NetworkPolicy")
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == "ml"
    trainer = spec["podSelector"]["matchLabels"]
    assert trainer["app.kubernetes.io/component"] == "trainer"
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    # Pods of a job reach each other on every port (NCCL/gloo pick random ports): a peer rule without ports.
    assert {"from": [{"podSelector": {"matchLabels": trainer}}]} in spec["ingress"]
    assert {"to": [{"podSelector": {"matchLabels": trainer}}]} in spec["egress"]
    metrics_ingress = next(rule for rule in spec["ingress"] if rule.get("ports"))
    assert metrics_ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    dns = next(rule for rule in spec["egress"] if any(p["port"] == 53 for p in rule.get("ports", [])))
    assert {p["protocol"] for p in dns["ports"]} == {"UDP", "TCP"}
    storage = next(rule for rule in spec["egress"] if any(p["port"] == 443 for p in rule.get("ports", [])))
    assert storage["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]


def test_namespaced_mode_creates_peering_and_roles_per_namespace() -> None:
    objects = helm.render(SCENARIOS["namespaced"])
    assert {o["metadata"]["namespace"] for o in helm.find(objects, "KopfPeering")} == {"team-a", "team-b"}
    assert {o["metadata"]["namespace"] for o in helm.find(objects, "Role")} == {"team-a", "team-b"}
    assert helm.find(objects, "ClusterKopfPeering") == []


def test_notes_render() -> None:
    notes = helm.notes(SCENARIOS["namespaced"])
    assert "team-a, team-b" in notes
    assert "kubetune-s3" in notes


def test_chart_ci_files_are_valid_yaml_mappings() -> None:
    for path in Path(helm.CHART_DIR / "ci").glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()) or {}, dict), path


def test_trainer_port_values_reach_the_pods_the_operator_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """``trainer.metricsPort`` and ``trainer.rendezvousPort`` (values.yaml) are the ports of the trainer pods the
    operator creates: the chart hands them to the operator, its builders use them, and it reads progress there."""
    settings = pytest.importorskip("kubetune_operator.settings")
    resolve: Any = pytest.importorskip("kubetune_operator.resolve")
    builders: Any = pytest.importorskip("kubetune_operator.builders")
    apply: Any = pytest.importorskip("kubetune_operator.apply")
    values = {"trainer": {"metricsPort": 9500, "rendezvousPort": 29600}, "operator": {"defaultCheckpointUri": "s3://c"}}
    container = helm.one(helm.render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for name in [n for n in os.environ if n.startswith("KUBETUNE_")]:
        monkeypatch.delenv(name)
    for env in container["env"]:
        monkeypatch.setenv(env["name"], env["value"])
    manifest = yaml.safe_load((helm.REPO / "examples" / "lora-sequence-classification.yaml").read_text())
    manifest["metadata"].update(namespace="ml", uid="0b5c6a0e-7d3c-4c1e-9b1a-3f7e2d9c1a00")
    _config_map, service, attempt_job = builders.desired_children(
        resolve.load_job(manifest, settings.load_settings()), attempt=1
    )
    pod = attempt_job["spec"]["template"]["spec"]
    (trainer,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in trainer["ports"]}
    assert ports == {"metrics": 9500, "rendezvous": 29600}
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["KUBETUNE_METRICS_PORT"] == "9500"
    assert env["KUBETUNE_MASTER_PORT"] == "29600"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"metrics": 9500, "rendezvous": 29600}
    running = {"spec": pod, "status": {"podIP": "10.0.0.7"}}
    assert apply.default_metrics_url(running) == "http://10.0.0.7:9500/metrics"


#: Operator settings values that ``load_settings`` refuses (the operator exits 2 at start-up, CrashLoopBackOff):
#: ``helm install`` must refuse them first.  The endpoint with user:password@ would also put a credential in
#: the Deployment.
REFUSED_BY_THE_OPERATOR = [
    ("operator", "checkpointEndpoint", "checkpoint_endpoint", "http://AKIAEXAMPLE:wJalrXUtn@minio.storage:9000"),
    ("operator", "checkpointEndpoint", "checkpoint_endpoint", "http://minio_storage:9000"),
    ("operator", "defaultCheckpointUri", "default_checkpoint_uri", "s3://ckpt/team a"),
    ("operator", "defaultCheckpointUri", "default_checkpoint_uri", "s3://user:password@host/ckpt"),
    ("operator", "defaultOutputUri", "default_output_uri", "s3://out/$(id)"),
    ("operator", "defaultImage", "default_image", "ghcr.io/kubetune/kubetune-trainer:0.1.0 "),
    ("operator", "credentialsSecret", "credentials_secret", "s3..creds"),
    ("peering", "name", "peering_name", "Kubetune_Peering"),
]


@pytest.mark.parametrize(("section", "key", "setting", "value"), REFUSED_BY_THE_OPERATOR, ids=lambda v: str(v))
def test_schema_rejects_settings_the_operator_refuses(section: str, key: str, setting: str, value: str) -> None:
    settings = pytest.importorskip("kubetune_operator.settings")
    with pytest.raises(settings.SettingsError):
        settings.load_settings(**{setting: value})
    with pytest.raises(helm_python.HelmError, match=key):
        helm.render({section: {key: value}})


@pytest.mark.parametrize(("replicas", "standalone"), [(1, True), (2, False)])
def test_without_a_peering_object_a_single_replica_runs_standalone(
    replicas: int, standalone: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf's peering is mandatory unless standalone: a replica waits for the peering object and, when none
    exists, never reconciles.  With ``peering.create: false`` a single replica must run standalone; several
    replicas still need a peering object (the platform team's own)."""
    settings = pytest.importorskip("kubetune_operator.settings")
    objects = helm.render({"peering": {"create": False}, "replicaCount": replicas})
    assert not helm.find(objects, "ClusterKopfPeering")
    assert not helm.find(objects, "KopfPeering")
    container = helm.one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    for name in [n for n in os.environ if n.startswith("KUBETUNE_")]:
        monkeypatch.delenv(name)
    for env in container["env"]:
        monkeypatch.setenv(env["name"], env["value"])
    assert settings.load_settings().standalone is standalone
