"""The deployment files in infra/ are well-formed and say only what tuneloop understands.

Pure-Python checks that always run: every YAML parses, every Kubernetes object validates against
the schemas kubernetes-validate ships, every environment variable handed to a tuneloop process
is one its settings read, every tuneloop command line parses with the real CLI, vLLM is sized for
the largest LoRA rank a policy allows and kept private to the gateway. (``docker compose config``
is not run: the compose plugin is not installable on these machines, and Debian's docker-compose
1.x predates the Compose Specification this file uses.)
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml
from pydantic import AliasChoices

from core import settings as settings_module
from core.policy import TrainingPolicy
from serving import vllm_resolver
from tuneloop.cli import app as cli_app
from workflows.worker import QUEUES

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "compose.yaml"
# Helm values for Temporal's chart: YAML, but not a Kubernetes object.
HELM_VALUES = {K8S / "temporal-values.yaml"}
K8S_VERSION = "1.37.0"
TUNELOOP_IMAGES = ("tuneloop:", "tuneloop-gpu:")
VLLM_IMAGES = ("tuneloop-vllm:", "tuneloop-vllm-cpu:")


def env_names_tuneloop_reads() -> set[str]:
    """Every environment variable name a settings class in core/settings.py accepts."""
    names: set[str] = set()
    classes = [
        c
        for _, c in inspect.getmembers(settings_module, inspect.isclass)
        if issubclass(c, settings_module.Settings)
    ]
    for cls in classes:
        for field in cls.model_fields.values():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names |= {a for a in alias.choices if isinstance(a, str) and a.isupper()}
            elif isinstance(alias, str):
                names.add(alias)
    return names


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path in HELM_VALUES:
            continue
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return out


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
    if template is None:
        return []
    pod = template["spec"]
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_services(image_prefixes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, svc in compose()["services"].items():
        image = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(svc.get("image", "")))
        if image.startswith(image_prefixes):
            out[name] = svc
    return out


def configmap_data() -> dict[str, str]:
    maps = [d for _, d in k8s_docs() if d["kind"] == "ConfigMap"]
    return {k: v for m in maps for k, v in m.get("data", {}).items()}


def test_every_yaml_file_parses() -> None:
    files = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert COMPOSE in files and len(files) >= 8
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


@pytest.mark.parametrize(
    ("path", "doc"),
    k8s_docs(),
    ids=lambda v: v.name if isinstance(v, Path) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_kubernetes_objects_validate_against_the_shipped_schemas(
    path: Path, doc: dict[str, Any]
) -> None:
    # strict: an unknown field (a typo such as `readinessprobe`) is an error, not silently ignored.
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"].get("namespace") in ("tuneloop", None), path


def test_kubernetes_set_has_every_component() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_docs()}
    for needed in (
        ("Deployment", "tuneloop-api"),
        ("HorizontalPodAutoscaler", "tuneloop-api"),
        ("Deployment", "tuneloop-worker-cpu"),
        ("Deployment", "tuneloop-worker-gpu"),
        ("StatefulSet", "vllm"),
        ("Job", "tuneloop-migrate"),
        ("NetworkPolicy", "vllm-only-from-api"),
    ):
        assert needed in kinds, needed
    hpa = next(d for _, d in k8s_docs() if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tuneloop-api"


def test_every_setting_passed_to_tuneloop_is_one_it_reads() -> None:
    reads = env_names_tuneloop_reads()
    # The checker itself must see the settings (a renamed alias would otherwise pass vacuously).
    assert {"DATABASE_URL", "TEMPORAL_ADDRESS", "TUNELOOP_VLLM_URLS"} <= reads
    passed: dict[str, str] = {}
    for key in configmap_data():
        passed[key] = "ConfigMap tuneloop-config"
    for path, doc in k8s_docs():
        for c in pod_containers(doc):
            if not str(c.get("image", "")).startswith(TUNELOOP_IMAGES):
                continue
            for e in c.get("env", []):
                passed[e["name"]] = f"{path.name} {doc['metadata']['name']}"
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    # Secret keys are named after the variable they fill: one name to rotate.
                    assert ref["key"] == e["name"], (path, e)
    anchors = compose()
    for name, svc in compose_services(TUNELOOP_IMAGES).items():
        for key in svc.get("environment") or {}:
            passed[key] = f"compose service {name}"
    assert "compose service api" in passed.values() and len(passed) >= 8
    unknown = {k: where for k, where in passed.items() if k not in reads}
    assert not unknown, f"settings tuneloop does not read (core/settings.py): {unknown}"
    assert anchors["services"]["api"]["environment"]["TUNELOOP_SERVING_BACKEND"] == "vllm"


def test_secrets_come_from_secrets() -> None:
    secret_like = (
        "DATABASE_URL",
        "STRIPE_API_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "TUNELOOP_SESSION_SECRET",
    )
    assert not set(secret_like) & set(configmap_data()), "secrets belong in a Secret"
    seen = 0
    for path, doc in k8s_docs():
        for c in pod_containers(doc):
            for e in c.get("env", []):
                if e["name"] in secret_like:
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (path, e)
                    seen += 1
    assert seen >= 4
    # Compose takes them from the environment / .env file, never literally.
    for name, svc in compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if key in secret_like or "PASSWORD" in key or key.endswith("PWD"):
                assert "${" in str(value), (name, key)


def check_cli(args: list[str]) -> None:
    """Parse ``tuneloop <args>`` with the real CLI's parser, down to the leaf command.

    Typer ships its own copy of click, so groups are recognised by what they do (``get_command``),
    not by click's classes.
    """
    command: Any = typer.main.get_command(cli_app)
    rest = list(args)
    while hasattr(command, "get_command"):
        assert rest, f"{args}: a group needs a subcommand"
        sub = command.get_command(command.make_context("tuneloop", [rest[0]]), rest[0])
        assert sub is not None, f"tuneloop has no command {rest[0]!r} ({args})"
        command, rest = sub, rest[1:]
    ctx = command.make_context("tuneloop", rest)
    if args[0] == "worker":
        assert ctx.params["queue"] in QUEUES, args


def tuneloop_command_lines() -> list[tuple[str, list[str]]]:
    out = []
    for path, doc in k8s_docs():
        for c in pod_containers(doc):
            if str(c.get("image", "")).startswith(TUNELOOP_IMAGES):
                assert "command" not in c, "keep the image's `tuneloop` entrypoint"
                out.append((f"{path.name}:{c['name']}", list(c["args"])))
    for name, svc in compose_services(TUNELOOP_IMAGES).items():
        out.append((f"compose:{name}", list(svc["command"])))
    return out


def test_every_tuneloop_command_line_parses() -> None:
    lines = tuneloop_command_lines()
    firsts = {args[0] for _, args in lines}
    assert {"api", "worker", "db"} <= firsts, firsts
    queues = {args[args.index("--queue") + 1] for _, args in lines if args[0] == "worker"}
    assert queues == {"cpu", "gpu"}, queues
    for where, args in lines:
        try:
            check_cli(args)
        except Exception as exc:  # click's UsageError, or an assertion above
            raise AssertionError(f"{where}: tuneloop {' '.join(args)}: {exc}") from exc
    # The check can fail: an unknown option, an unknown command, a queue no worker polls.
    with pytest.raises(Exception, match="No such option"):
        check_cli(["worker", "--queues", "cpu"])
    with pytest.raises(AssertionError, match="no command"):
        check_cli(["workers"])
    with pytest.raises(AssertionError):
        check_cli(["worker", "--queue", "tpu"])


def test_dockerfiles_entrypoints_and_copies() -> None:
    tuneloop = (INFRA / "docker" / "tuneloop.Dockerfile").read_text()
    assert 'ENTRYPOINT ["tuneloop"]' in tuneloop
    default = re.search(r"^CMD (\[.*\])$", tuneloop, re.M)
    assert default is not None
    check_cli(yaml.safe_load(default.group(1)))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:  # a package the image forgot would fail at import, in production
        assert f"COPY {package} {package}" in tuneloop, package
    vllm = (INFRA / "docker" / "vllm.Dockerfile").read_text()
    plugin = next(iter(project["project"]["entry-points"]["vllm.general_plugins"]))
    assert f"VLLM_PLUGINS={plugin}" in vllm and "COPY serving" in vllm
    assert vllm.count("pip install --no-deps /opt/tuneloop") == 2


def vllm_specs() -> list[tuple[str, list[str], dict[str, str]]]:
    out = []
    for path, doc in k8s_docs():
        for c in pod_containers(doc):
            if str(c.get("image", "")).startswith(VLLM_IMAGES):
                env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
                out.append((f"{path.name}:{c['name']}", list(c["args"]), env))
    for name, svc in compose_services(VLLM_IMAGES).items():
        out.append((f"compose:{name}", list(svc["command"]), dict(svc["environment"])))
    return out


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_vllm_is_sized_for_tenant_adapters_and_runs_the_resolver() -> None:
    specs = vllm_specs()
    assert len(specs) == 2, specs  # the StatefulSet and the compose service
    max_policy_rank = next(
        m.le for m in TrainingPolicy.model_fields["rank"].metadata if hasattr(m, "le")
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    plugin = next(iter(project["project"]["entry-points"]["vllm.general_plugins"]))
    for where, args, env in specs:
        assert _flag(args, "--enable-lora") == "", where
        max_loras, cpu_loras = (
            int(_flag(args, "--max-loras") or 0),
            int(_flag(args, "--max-cpu-loras") or 0),
        )
        rank = int(_flag(args, "--max-lora-rank") or 0)
        assert 1 <= max_loras <= cpu_loras, where
        # A tenant whose policy asks for the largest rank must still be servable.
        assert rank >= max_policy_rank, (where, rank, max_policy_rank)
        assert env.get("VLLM_PLUGINS") == plugin, where
        assert env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True", where
        tuneloop_vars = {k for k in env if k.startswith("TUNELOOP_")}
        assert tuneloop_vars == {vllm_resolver.ROOT_ENV}, (where, tuneloop_vars)
        assert env[vllm_resolver.ROOT_ENV].endswith("/artifacts"), where


def test_gateway_urls_name_every_vllm_replica() -> None:
    sts = next(d for _, d in k8s_docs() if d["kind"] == "StatefulSet")
    name, service, replicas = (
        sts["metadata"]["name"],
        sts["spec"]["serviceName"],
        sts["spec"]["replicas"],
    )
    urls = configmap_data()["TUNELOOP_VLLM_URLS"].split(",")
    expected = [
        f"http://{name}-{i}.{service}.tuneloop.svc.cluster.local:8000" for i in range(replicas)
    ]
    assert urls == expected
    headless = next(
        d for _, d in k8s_docs() if d["kind"] == "Service" and d["metadata"]["name"] == service
    )
    assert headless["spec"]["clusterIP"] == "None"


def test_api_probes_use_the_health_routes() -> None:
    from api.app import create_app
    from core.settings import ApiSettings

    routes = set(create_app(ApiSettings(data_dir="/nonexistent")).openapi()["paths"])
    api = next(
        d
        for _, d in k8s_docs()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tuneloop-api"
    )
    (c,) = pod_containers(api)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz"} <= routes
    healthcheck = " ".join(compose()["services"]["api"]["healthcheck"]["test"])
    assert "/readyz" in healthcheck


def test_vllm_is_reachable_only_from_the_gateway() -> None:
    policies = [d for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    vllm_labels = next(d for _, d in k8s_docs() if d["kind"] == "StatefulSet")["spec"]["template"][
        "metadata"
    ]["labels"]
    api_labels = next(
        d
        for _, d in k8s_docs()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tuneloop-api"
    )["spec"]["template"]["metadata"]["labels"]
    selecting = [
        p
        for p in policies
        if p["spec"]["podSelector"].get("matchLabels", {}).items() <= vllm_labels.items()
        and p["spec"]["podSelector"].get("matchLabels")
    ]
    assert selecting, "no NetworkPolicy selects the vLLM pods"
    for p in selecting:
        assert "Ingress" in p["spec"]["policyTypes"]
        for rule in p["spec"].get("ingress", []):
            for peer in rule["from"]:
                # Only pods (no ipBlock, no namespaceSelector) and only ones with the API's labels.
                assert set(peer) == {"podSelector"}, peer
                assert peer["podSelector"]["matchLabels"].items() <= api_labels.items(), peer
    # In compose: vLLM publishes no port and sits only on the internal (no route out) network.
    svc = compose()["services"]["vllm"]
    assert "ports" not in svc and svc["networks"] == ["internal"]
    assert compose()["networks"]["internal"]["internal"] is True


def test_the_schema_check_can_fail() -> None:
    _, api = next(
        (p, d)
        for p, d in k8s_docs()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tuneloop-api"
    )
    broken = yaml.safe_load(yaml.safe_dump(api))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
