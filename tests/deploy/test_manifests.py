"""The deployment manifests in deploy/, validated offline: no cluster, and no Ray started.

* ``deploy/ray/serve.yaml``, and the RayService's ``serveConfigV2``: Ray's own schema
  (``ray.serve.schema.ServeDeploySchema``), with every key checked against its models' fields
  (pydantic ignores unknown keys), each ``autoscaling_config`` by
  ``ray.serve.config.AutoscalingConfig`` (the schema takes any dict there), and the builder's
  ``args`` by ``stream_engine.server.ray_serve.build`` (it checks every setting and binds the
  deployment without starting Ray);
* ``deploy/k8s/rayservice.yaml``: the Ingress, and each pod template of the RayService as a
  core ``PodTemplate``, by kubernetes_validate's strict schemas (unknown fields fail); the
  RayService's own fields by :data:`RAYSERVICE_SCHEMA`, written here from KubeRay's CRD;
* the numbers that must agree between them: timeouts, GPUs, autoscaling bounds, names.

Each check is shown to fail on a mutated copy (``test_*_rejects``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml

from stream_engine.config import Settings, settings_from
from stream_engine.errors import InvalidOption

ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = ROOT / "deploy" / "ray" / "serve.yaml"
RAYSERVICE_YAML = ROOT / "deploy" / "k8s" / "rayservice.yaml"

KUBERNETES_VERSION = "1.33"  # kubernetes_validate ships schemas for 1.25 to 1.37
BUILDER = "stream_engine.server.ray_serve:build"
SHUTDOWN_MARGIN_S = 10.0  # graceful_shutdown_timeout_s >= shutdown_timeout_s + this
INGRESS_TIMEOUT_S = 3600  # nginx's read/send timeouts, at least (its default 60 s cuts sessions)
NGINX = "nginx.ingress.kubernetes.io/"


class ManifestError(ValueError):
    """A manifest that its schema accepts but that would not work as meant."""


# -- the RayService's own fields -------------------------------------------------------------

# Written from KubeRay's CRD ray-operator/config/crd/bases/ray.io_rayservices.yaml (version
# v1) in github.com/ray-project/kuberay at commit feeaf72facab4881ba2b179248bb67315634e229:
# the types, required fields and enums of the fields deploy/k8s/rayservice.yaml uses, and
# only those: any other field is refused here (additionalProperties: false at every level),
# so that a typo fails. The pod templates are core PodTemplateSpecs, validated apart.
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_TEMPLATE = {"type": "object"}  # a PodTemplateSpec: kubernetes_validate checks it


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


RAYSERVICE_SCHEMA: dict[str, Any] = _closed(
    {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": _closed(
            {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": _STRINGS,
                "annotations": _STRINGS,
            },
            required=("name",),
        ),
        "spec": _closed(
            {
                "serveConfigV2": {"type": "string"},
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "rayClusterDeletionDelaySeconds": {**_INT32, "minimum": 0},
                "rayClusterConfig": _closed(
                    {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": _closed(
                            {
                                "upscalingMode": {
                                    "enum": ["Default", "Aggressive", "Conservative"]
                                },
                                "idleTimeoutSeconds": _INT32,
                            }
                        ),
                        "headGroupSpec": _closed(
                            {"rayStartParams": _STRINGS, "template": _TEMPLATE},
                            required=("template",),
                        ),
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": _closed(
                                {
                                    "groupName": {"type": "string"},
                                    "replicas": _INT32,
                                    "minReplicas": _INT32,
                                    "maxReplicas": _INT32,
                                    "rayStartParams": _STRINGS,
                                    "template": _TEMPLATE,
                                },
                                required=("groupName", "maxReplicas", "minReplicas", "template"),
                            ),
                        },
                    },
                    required=("headGroupSpec",),
                ),
            },
            required=("rayClusterConfig",),
        ),
    },
    required=("apiVersion", "kind", "metadata", "spec"),
)


# -- the Serve config (serve.yaml, serveConfigV2) --------------------------------------------


def _unknown_keys(annotation: Any, value: Any, where: str) -> list[str]:
    """The keys in ``value`` that no pydantic model in ``annotation`` has as a field, at any
    depth (pydantic ignores them, so a misspelt option would silently take its default)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        if not isinstance(value, dict):
            return []
        found = []
        for key, item in value.items():
            field = annotation.model_fields.get(key)
            if field is None:
                found.append(f"{where}{key}")
            else:
                found += _unknown_keys(field.annotation, item, f"{where}{key}.")
        return found
    if origin is typing.Annotated:
        return _unknown_keys(args[0], value, where)
    if origin in (list, tuple, set) and isinstance(value, list) and args:
        at = where.removesuffix(".")
        return [k for i, v in enumerate(value) for k in _unknown_keys(args[0], v, f"{at}[{i}].")]
    if origin in (typing.Union, types.UnionType):
        # the one model of the union that a mapping (or a list) would be validated as
        fits = [a for a in args if _fits(a, value)]
        return _unknown_keys(fits[0], value, where) if len(fits) == 1 else []
    return []


def _fits(annotation: Any, value: Any) -> bool:
    if isinstance(value, dict):
        return isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)
    if isinstance(value, list):
        return typing.get_origin(annotation) in (list, tuple, set)
    return False


class ServeCheck(NamedTuple):
    config: dict[str, Any]  # the file as parsed
    app: dict[str, Any]  # the stream-engine application
    deployment: dict[str, Any]  # its StreamEngine deployment
    settings: Settings  # what the replicas will run with


def check_serve_config(config: Any) -> ServeCheck:
    """Validate a Serve config file's contents as ``serve deploy`` (and KubeRay) would, but
    strictly, and as stream-engine needs them. Raises on the first problem."""
    schema = pytest.importorskip("ray.serve.schema")
    from ray.serve.config import AutoscalingConfig

    from stream_engine.server.ray_serve import APP_NAME, DEPLOYMENT_NAME, build

    unknown = _unknown_keys(schema.ServeDeploySchema, config, "")
    if unknown:
        raise ManifestError(f"unknown key(s), which Serve would ignore: {unknown}")
    parsed = schema.ServeDeploySchema.model_validate(config)
    if parsed.http_options.request_timeout_s is not None:
        raise ManifestError("http_options.request_timeout_s would cut long WebSocket sessions")
    apps = [a for a in config["applications"] if a.get("name") == APP_NAME]
    if len(apps) != 1:
        raise ManifestError(f"no single application named {APP_NAME!r}")
    app = apps[0]
    if app.get("import_path") != BUILDER:
        raise ManifestError(f"import_path must be {BUILDER}, got {app.get('import_path')!r}")
    deployments = app.get("deployments", [])
    if [d.get("name") for d in deployments] != [DEPLOYMENT_NAME]:
        raise ManifestError(f"deployments must be one, named {DEPLOYMENT_NAME!r}")
    deployment = deployments[0]
    if deployment.get("autoscaling_config") is not None:
        AutoscalingConfig.model_validate(deployment["autoscaling_config"])
    args = app.get("args", {})
    build(args)  # checks the arguments and every setting; starts nothing
    settings = settings_from(args.get("settings", {}))
    grace = deployment.get("graceful_shutdown_timeout_s")
    if grace is None or grace < settings.server.shutdown_timeout_s + SHUTDOWN_MARGIN_S:
        raise ManifestError(
            f"graceful_shutdown_timeout_s ({grace}) must be set, at least the server's "
            f"shutdown_timeout_s ({settings.server.shutdown_timeout_s}) + {SHUTDOWN_MARGIN_S}"
        )
    return ServeCheck(config, app, deployment, settings)


# -- the Kubernetes documents ----------------------------------------------------------------


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        raise ManifestError(f"expected one {kind}, found {len(found)}")
    return found[0]


def _templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    found = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        found[f"worker {group['groupName']}"] = group["template"]
    return found


def check_pod_templates(rayservice: dict[str, Any]) -> None:
    for name, template in _templates(rayservice).items():
        document = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name.replace(" ", "-")},
            "template": template,
        }
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def check_rayservice_fields(rayservice: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(RAYSERVICE_SCHEMA).validate(rayservice)


def serve_config_of(rayservice: dict[str, Any]) -> ServeCheck:
    return check_serve_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))


def check_consistency(rayservice: dict[str, Any], ingress: dict[str, Any]) -> None:
    """What must agree between the Serve config, the pods and the Ingress."""
    serve = serve_config_of(rayservice)
    cluster = rayservice["spec"]["rayClusterConfig"]
    if cluster["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        raise ManifestError('the head needs rayStartParams num-cpus: "0" (no replica there)')
    grace = serve.deployment["graceful_shutdown_timeout_s"]
    actor = serve.deployment.get("ray_actor_options", {})
    scaling = serve.deployment.get("autoscaling_config") or {}
    groups = cluster.get("workerGroupSpecs", [])
    if not groups:
        raise ManifestError("no worker group: the replicas need GPU workers")
    for group in groups:
        spec = group["template"]["spec"]
        pod_grace = spec.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        if pod_grace <= grace:
            raise ManifestError(
                f"worker group {group['groupName']}: terminationGracePeriodSeconds "
                f"({pod_grace}) must exceed graceful_shutdown_timeout_s ({grace})"
            )
        gpus = sum(
            float(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for c in spec["containers"]
        )
        if gpus < actor.get("num_gpus", 0) or gpus == 0:
            raise ManifestError(f"worker group {group['groupName']}: no GPU for a replica")
        if not spec.get("nodeSelector") or not spec.get("tolerations"):
            raise ManifestError(f"worker group {group['groupName']}: GPU node selection")
        # one replica per pod: the pods' bounds are the replicas' bounds
        if scaling and (group["minReplicas"], group["maxReplicas"]) != (
            scaling["min_replicas"],
            scaling["max_replicas"],
        ):
            raise ManifestError(
                f"worker group {group['groupName']}: minReplicas/maxReplicas must be the "
                f"deployment's min_replicas/max_replicas"
            )
    annotations = ingress["metadata"].get("annotations", {})
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        value = annotations.get(NGINX + name)
        if value is None or int(value) < INGRESS_TIMEOUT_S:
            raise ManifestError(f"the Ingress's {name} must be >= {INGRESS_TIMEOUT_S}, got {value}")
    port = serve.config["http_options"]["port"]
    expected = {"name": f"{rayservice['metadata']['name']}-serve-svc", "port": {"number": port}}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            if path["backend"].get("service") != expected:
                raise ManifestError(f"the Ingress's backend must be {expected}")


def check_k8s(docs: list[Any]) -> None:
    """Every check of deploy/k8s/rayservice.yaml's documents."""
    if not all(isinstance(d, dict) for d in docs):
        raise ManifestError("every document must be a mapping")
    rayservice = _one(docs, "RayService")
    ingress = _one(docs, "Ingress")
    if len(docs) != 2:
        raise ManifestError(f"expected a RayService and an Ingress, found {len(docs)} documents")
    kubernetes_validate.validate(ingress, KUBERNETES_VERSION, strict=True)
    check_rayservice_fields(rayservice)
    check_pod_templates(rayservice)
    check_consistency(rayservice, ingress)  # serveConfigV2 included


def load_serve() -> Any:
    return yaml.safe_load(SERVE_YAML.read_text())


def load_k8s() -> list[Any]:
    return list(yaml.safe_load_all(RAYSERVICE_YAML.read_text()))


# -- the files as they are -------------------------------------------------------------------


def test_serve_yaml_validates():
    check = check_serve_config(load_serve())
    assert check.app["args"]["model"] == "random:small"  # runs on any machine
    assert check.deployment["ray_actor_options"]["num_gpus"] == 0
    assert dict(check.settings.server.voice_aliases) == {"alloy": "v2/en_speaker_6"}


def test_build_starts_nothing():
    ray = pytest.importorskip("ray")
    check_serve_config(load_serve())
    assert not ray.is_initialized()


def test_autoscaling_uses_the_project_defaults():
    from stream_engine.server.scaling import Scaling

    for check in (
        check_serve_config(load_serve()),
        serve_config_of(_one(load_k8s(), "RayService")),
    ):
        scaling = check.deployment["autoscaling_config"]
        assert scaling["target_ongoing_requests"] == Scaling.target_connections
        assert check.deployment["max_ongoing_requests"] == Scaling.max_connections


def test_k8s_documents_parse():
    docs = load_k8s()
    assert [d["kind"] for d in docs] == ["RayService", "Ingress"]
    assert [d["apiVersion"] for d in docs] == ["ray.io/v1", "networking.k8s.io/v1"]


def test_ingress_validates():
    kubernetes_validate.validate(_one(load_k8s(), "Ingress"), KUBERNETES_VERSION, strict=True)


def test_pod_templates_validate():
    rayservice = _one(load_k8s(), "RayService")
    assert sorted(_templates(rayservice)) == ["head", "worker gpu"]
    check_pod_templates(rayservice)


def test_rayservice_fields_validate():
    check_rayservice_fields(_one(load_k8s(), "RayService"))


def test_serve_config_v2_validates():
    check = serve_config_of(_one(load_k8s(), "RayService"))
    assert check.app["args"]["device"] == "cuda"
    assert check.deployment["ray_actor_options"]["num_gpus"] == 1


def test_k8s_is_consistent():
    check_k8s(load_k8s())


def test_serve_yaml_and_serve_config_v2_agree():
    """The same application, on a CPU here and on GPUs there."""
    local = check_serve_config(load_serve())
    gpu = serve_config_of(_one(load_k8s(), "RayService"))
    assert local.settings.server == gpu.settings.server
    assert local.config["http_options"] == gpu.config["http_options"]
    same = ("max_ongoing_requests", "graceful_shutdown_timeout_s")
    assert {k: local.deployment[k] for k in same} == {k: gpu.deployment[k] for k in same}


# -- each check fails when it should ---------------------------------------------------------

Mutation = Callable[[Any], None]
Path_ = tuple[str | int, ...]  # keys and list indices, from the top


def _parent(data: Any, path: Path_) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


def _set(path: Path_, value: Any) -> Mutation:
    """Set the item at ``path`` (with value ``...``: delete it)."""

    def mutate(data: Any) -> None:
        parent = _parent(data, path)
        if value is ...:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value

    return mutate


def _rename(path: Path_, new: str) -> Mutation:
    def mutate(data: Any) -> None:
        parent = _parent(data, path)
        parent[new] = parent.pop(path[-1])

    return mutate


APP: Path_ = ("applications", 0)
DEPLOYMENT: Path_ = (*APP, "deployments", 0)
ACTOR: Path_ = (*DEPLOYMENT, "ray_actor_options")
AUTOSCALING: Path_ = (*DEPLOYMENT, "autoscaling_config")
SERVER: Path_ = (*APP, "args", "settings", "server")
GRACE = "graceful_shutdown_timeout_s"


def _case(id: str, mutate: Mutation, error: type[Exception], match: str) -> Any:
    """A mutated copy that ``error`` with ``match`` in its message must reject: the check
    meant, not another one that happens to fail too."""
    return pytest.param(mutate, error, match, id=id)


UNKNOWN = "unknown key"
SERVE_MUTATIONS = [
    # unknown keys, at every level (pydantic would ignore them)
    _case("num_cpu", _rename((*ACTOR, "num_cpus"), "num_cpu"), ManifestError, r"\.num_cpu'"),
    _case("deployment-key", _rename((*DEPLOYMENT, GRACE), "grace_s"), ManifestError, UNKNOWN),
    _case(
        "autoscaling-key", _rename((*AUTOSCALING, "min_replicas"), "min"), ManifestError, UNKNOWN
    ),
    _case("app-key", _rename((*APP, "route_prefix"), "route_prefx"), ManifestError, UNKNOWN),
    _case("http-key", _rename(("http_options", "port"), "prot"), ManifestError, UNKNOWN),
    # Ray's schema, and AutoscalingConfig
    _case(
        "type",
        _set((*DEPLOYMENT, "max_ongoing_requests"), "many"),
        pydantic.ValidationError,
        "ServeDeploySchema",
    ),
    _case(
        "min>max",
        _set((*AUTOSCALING, "min_replicas"), 5),
        pydantic.ValidationError,
        "AutoscalingConfig",
    ),
    # what stream-engine needs
    _case(
        "request-timeout",
        _set(("http_options", "request_timeout_s"), 600),
        ManifestError,
        "request_timeout_s",
    ),
    _case("name", _set((*DEPLOYMENT, "name"), "Streamengine"), ManifestError, "named"),
    _case("import-path", _set((*APP, "import_path"), "x:build"), ManifestError, "import_path"),
    _case("grace-short", _set((*DEPLOYMENT, GRACE), 15), ManifestError, GRACE),
    _case("grace-unset", _set((*DEPLOYMENT, GRACE), ...), ManifestError, GRACE),
    # the builder
    _case("builder-arg", _rename((*APP, "args", "model"), "modle"), InvalidOption, "modle"),
    _case(
        "setting-key",
        _rename((*SERVER, "shutdown_timeout_s"), "shutdown_timeout"),
        InvalidOption,
        "shutdown_timeout'",
    ),
    _case("setting-value", _set((*SERVER, "shutdown_timeout_s"), -1), InvalidOption, "-1"),
]


@pytest.mark.parametrize(("mutate", "error", "match"), SERVE_MUTATIONS)
def test_serve_yaml_rejects(mutate: Mutation, error: type[Exception], match: str):
    config = load_serve()
    mutate(config)
    with pytest.raises(error, match=match):
        check_serve_config(config)


def _in_serve_config_v2(mutate: Mutation) -> Mutation:
    def apply(docs: Any) -> None:
        spec = docs[0]["spec"]
        config = yaml.safe_load(spec["serveConfigV2"])
        mutate(config)
        spec["serveConfigV2"] = yaml.safe_dump(config)

    return apply


CLUSTER: Path_ = (0, "spec", "rayClusterConfig")
HEAD: Path_ = (*CLUSTER, "headGroupSpec")
WORKER: Path_ = (*CLUSTER, "workerGroupSpecs", 0)
WORKER_POD: Path_ = (*WORKER, "template", "spec")
INGRESS: Path_ = (1, "spec", "rules", 0, "http", "paths", 0)
ANNOTATIONS: Path_ = (1, "metadata", "annotations")
K8S_ERROR = kubernetes_validate.ValidationError
SCHEMA_ERROR = jsonschema.ValidationError
TERMINATION = "terminationGracePeriodSeconds"
K8S_MUTATIONS = [
    # the RayService's own fields: the JSON Schema from KubeRay's CRD
    _case(
        "serveConfigV2x",
        _rename((0, "spec", "serveConfigV2"), "serveConfigV2x"),
        SCHEMA_ERROR,
        "'serveConfigV2x' was unexpected",
    ),
    _case(
        "minReplica",
        _rename((*WORKER, "minReplicas"), "minReplica"),
        SCHEMA_ERROR,
        "'minReplicas' is a required",
    ),
    _case("param-type", _set((*HEAD, "rayStartParams", "num-cpus"), 0), SCHEMA_ERROR, "string"),
    _case(
        "enum", _set((*CLUSTER, "autoscalerOptions", "upscalingMode"), "Fast"), SCHEMA_ERROR, "Fast"
    ),
    _case("required", _set((*WORKER, "groupName"), ...), SCHEMA_ERROR, "'groupName' is a required"),
    _case("apiVersion", _set((0, "apiVersion"), "ray.io/v1alpha1"), SCHEMA_ERROR, "'ray.io/v1'"),
    # the pod templates: kubernetes_validate, strict
    _case(
        "nodeSelectr",
        _rename((*WORKER_POD, "nodeSelector"), "nodeSelectr"),
        K8S_ERROR,
        "'nodeSelectr' was unexpected",
    ),
    _case(
        "head-container",
        _rename((*HEAD, "template", "spec", "containers", 0, "resources"), "resource"),
        K8S_ERROR,
        "'resource' was unexpected",
    ),
    _case("toleration", _set((*WORKER_POD, "tolerations", 0, "effect"), 3), K8S_ERROR, "3 is not"),
    # the Ingress: kubernetes_validate, strict
    _case(
        "ingress-key",
        _rename((1, "spec", "ingressClassName"), "ingressClass"),
        K8S_ERROR,
        "'ingressClass' was unexpected",
    ),
    _case("pathType", _set((*INGRESS, "pathType"), ...), K8S_ERROR, "'pathType' is a required"),
    # serveConfigV2: validated as serve.yaml is
    _case(
        "v2-num_cpu",
        _in_serve_config_v2(_rename((*ACTOR, "num_cpus"), "num_cpu")),
        ManifestError,
        r"\.num_cpu'",
    ),
    _case(
        "v2-builder-arg",
        _in_serve_config_v2(_rename((*APP, "args", "device"), "devise")),
        InvalidOption,
        "devise",
    ),
    _case(
        "v2-grace-short",
        _in_serve_config_v2(_set((*DEPLOYMENT, GRACE), 5)),
        ManifestError,
        "shutdown_timeout_s",
    ),
    # what must agree
    _case("pod-grace", _set((*WORKER_POD, TERMINATION), 60), ManifestError, TERMINATION),
    _case("pod-grace-unset", _set((*WORKER_POD, TERMINATION), ...), ManifestError, TERMINATION),
    _case(
        "v2-grace-long",
        _in_serve_config_v2(_set((*DEPLOYMENT, GRACE), 95)),
        ManifestError,
        TERMINATION,
    ),
    _case(
        "read-timeout",
        _set((*ANNOTATIONS, NGINX + "proxy-read-timeout"), "60"),
        ManifestError,
        "proxy-read-timeout",
    ),
    _case(
        "send-timeout",
        _set((*ANNOTATIONS, NGINX + "proxy-send-timeout"), ...),
        ManifestError,
        "proxy-send-timeout",
    ),
    _case("head-cpus", _set((*HEAD, "rayStartParams", "num-cpus"), "1"), ManifestError, "head"),
    _case(
        "no-gpu",
        _set((*WORKER_POD, "containers", 0, "resources", "limits", "nvidia.com/gpu"), ...),
        ManifestError,
        "no GPU",
    ),
    _case(
        "no-node-selection",
        _set((*WORKER_POD, "nodeSelector"), ...),
        ManifestError,
        "node selection",
    ),
    _case("worker-bounds", _set((*WORKER, "maxReplicas"), 8), ManifestError, "maxReplicas"),
    _case(
        "backend",
        _set((*INGRESS, "backend", "service", "name"), "stream-engine-svc"),
        ManifestError,
        "backend",
    ),
    _case(
        "extra-document",
        lambda docs: docs.append({"kind": "Service"}),
        ManifestError,
        "3 documents",
    ),
]


@pytest.mark.parametrize(("mutate", "error", "match"), K8S_MUTATIONS)
def test_k8s_rejects(mutate: Mutation, error: type[Exception], match: str):
    docs = load_k8s()
    mutate(docs)
    with pytest.raises(error, match=match):
        check_k8s(docs)
