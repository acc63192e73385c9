"""Names, labels and annotations of everything the operator creates or reads: each stated here once.

Children are found again by name, never by a generated one: a reconcile that
runs twice (kopf delivers at least once) finds what the first one created.
``tests/unit/test_single_definitions.py`` fails when a label or annotation key, or the
``<name>-a<attempt>`` naming, is spelled anywhere else in ``operator/``.
"""

from __future__ import annotations

# -- label keys (the app.kubernetes.io ones are Kubernetes' recommended labels)
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_JOB_NAME = "kubetune.io/job-name"  # the FineTuneJob a child belongs to (the PodMonitor copies it)
LABEL_ATTEMPT = "kubetune.io/attempt"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue admits Jobs that carry it

# -- node taints that say a node's kubelet is gone (the node lifecycle controller sets them)
NODE_UNREACHABLE_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")

# -- annotation keys
# The Job controller puts a pod's completion index in this annotation (and, since Kubernetes 1.28, a label).
COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"
KOPF_PREFIX = "kubetune.io"  # kopf keeps its progress in annotations under this prefix
KOPF_DIFFBASE_KEY = "last-handled-configuration"
FINALIZER = "kubetune.io/operator"

# -- label values
APP_NAME = "kubetune"
COMPONENT_TRAINER = "trainer"
MANAGED_BY = "kubetune-operator"

CONTAINER_NAME = "trainer"
ATTEMPT_SEPARATOR = "-a"


def job_name_for(name: str, attempt: int) -> str:
    """Name of the batch/v1 Job of ``attempt`` (1-based): ``<name>-a<attempt>``."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return f"{name}{ATTEMPT_SEPARATOR}{attempt}"


def attempt_of(job_name: str, name: str) -> int | None:
    """The attempt number encoded in a Job name of FineTuneJob ``name``, or None."""
    prefix = name + ATTEMPT_SEPARATOR
    if not job_name.startswith(prefix):
        return None
    rest = job_name[len(prefix) :]
    return int(rest) if rest.isdigit() and not rest.startswith("0") else None


def service_name(name: str) -> str:
    """Name of the headless Service giving the pods stable host names."""
    return name


def config_map_name(name: str) -> str:
    """Name of the ConfigMap holding the trainer config (``job.json``)."""
    return f"{name}-config"


def pod_hostname(name: str, attempt: int, index: int) -> str:
    """Host name Kubernetes gives completion ``index`` of an Indexed Job: ``<job>-<index>``."""
    return f"{job_name_for(name, attempt)}-{index}"


def master_address(job_name: str, attempt: int) -> str:
    """Rendezvous host of ``attempt``: pod index 0 through the headless Service
    (``<name>-a<attempt>-0.<service>``, resolvable from every pod of the namespace)."""
    return f"{pod_hostname(job_name, attempt, 0)}.{service_name(job_name)}"


def standard_labels(name: str, attempt: int) -> dict[str, str]:
    """The labels on everything the operator creates for job ``name``."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_COMPONENT: COMPONENT_TRAINER,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_INSTANCE: name,
        LABEL_JOB_NAME: name,
        LABEL_ATTEMPT: str(attempt),
    }


def children_selector(name: str, attempt: int | None = None) -> dict[str, str]:
    """Label selector of the Jobs and pods of FineTuneJob ``name`` (of one attempt when given)."""
    selector = {LABEL_JOB_NAME: name}
    if attempt is not None:
        selector[LABEL_ATTEMPT] = str(attempt)
    return selector


def trainer_pod_selector(name: str) -> dict[str, str]:
    """The Service's selector: the trainer pods of every attempt of ``name``."""
    return {LABEL_JOB_NAME: name, LABEL_COMPONENT: COMPONENT_TRAINER}


def completion_index_field_path() -> str:
    """The downward-API field path of a pod's completion index."""
    return f"metadata.annotations['{COMPLETION_INDEX_KEY}']"
