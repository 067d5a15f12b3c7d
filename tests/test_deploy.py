"""The deployment files, parsed and checked (Docker and a cluster cannot run here): the compose file
against the Compose Specification schema (vendored by check-jsonschema) and for what the stack needs,
the Dockerfile, the Kubernetes manifests against the Kubernetes OpenAPI schemas (kubernetes-validate,
offline) and for replicas, probes, autoscaling, wiring and the Prometheus scrape configuration, and the
Grafana provisioning files."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT
from gateway.policy import load_policies

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSIONS = ("1.30.0", "1.37.0")


# ------------------------------------------------------------------------------------------ compose

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_schema() -> dict[str, Any]:
    files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((files / "compose-spec.json").read_text())


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["replicaz"] = 2
    assert list(validator.iter_errors(broken)), "the schema validator accepts anything"


def memory_bytes(value: str) -> int:
    """Redis (1gb, 768mb) and Kubernetes (1Gi, 512Mi) memory sizes in bytes."""
    match = re.fullmatch(r"(\d+)\s*(gb|mb|kb|b|Gi|Mi|Ki)?", value)
    assert match, value
    scale = {"gb": 1 << 30, "mb": 1 << 20, "kb": 1 << 10, "b": 1, "Gi": 1 << 30, "Mi": 1 << 20, "Ki": 1 << 10}
    return int(match.group(1)) * scale[match.group(2) or "b"]


def host_path(spec: str) -> tuple[Path | None, str]:
    source, target = spec.split(":")[:2]
    if source.startswith((".", "/")):
        return (DEPLOY / source).resolve(), target
    return None, target            # a named volume


def test_compose_stack_has_what_it_promises(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"gateway", "redis", "prometheus", "grafana", "clickhouse"} <= set(services)
    core = {name for name, s in services.items() if "profiles" not in s}
    assert core == {"gateway", "redis", "prometheus", "grafana", "clickhouse"}
    for name, service in services.items():                                    # every bind mount exists
        for spec in service.get("volumes", []):
            path, _ = host_path(spec)
            assert path is None or path.exists(), (name, spec)
            if path is None:
                assert spec.split(":")[0] in compose["volumes"], (name, spec)

    gw = services["gateway"]
    command = gw["command"]
    assert command[0] == "serve" and int(command[command.index("--workers") + 1]) >= 2
    assert gw["environment"]["GATEWAY_REDIS_URL"].startswith("redis://redis:")
    assert "4000:4000" in gw["ports"]
    assert (DEPLOY / gw["build"]["context"]).resolve() == ROOT
    assert (ROOT / gw["build"]["dockerfile"]).is_file() and services["demo"]["image"] == gw["image"]
    policies_dir, target = host_path(gw["volumes"][0])
    assert target == gw["environment"]["GATEWAY_CONFIG_DIR"] and policies_dir is not None
    policies = load_policies(str(policies_dir))                             # the stack's policies are valid
    assert "demo" in policies.models

    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert memory_bytes(redis_cmd[redis_cmd.index("--maxmemory") + 1]) > 0
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "volatile-lru"   # as policies/README.md says
    assert any(host_path(v)[1] == "/data" for v in services["redis"]["volumes"])

    prom = services["prometheus"]
    prom_dir, prom_target = host_path(prom["volumes"][0])
    assert prom_dir == DEPLOY / "prometheus" and prom_target == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"] and (DEPLOY / "prometheus" / "alerts.yml").is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["llm-gateway"]["static_configs"][0]["targets"] == ["gateway:4000"]
    assert jobs["llm-gateway-demo"]["static_configs"][0]["targets"] == ["demo:4001"]

    grafana = services["grafana"]
    mounts = {target: path for path, target in map(host_path, grafana["volumes"]) if path is not None}
    assert mounts["/etc/grafana/provisioning"] == ROOT / "grafana" / "provisioning"
    assert mounts["/var/lib/grafana/dashboards/llm-gateway"] == ROOT / "grafana" / "dashboards"
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/llm-gateway.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/llm-gateway"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "grafana" / "dashboards" / Path(home).name).is_file()

    demo = services["demo"]
    assert demo["profiles"] == ["demo"] and demo["command"][0] == "demo" and "--keep-serving" in demo["command"]
    assert demo["environment"]["GATEWAY_REDIS_URL"] != gw["environment"]["GATEWAY_REDIS_URL"]   # own database
    assert "4001:4001" in demo["ports"]
    demo_check = " ".join(demo["healthcheck"]["test"])                     # not the image's :4000 check
    assert "127.0.0.1:4001/health/ready" in demo_check and ":4000" not in demo_check
    assert demo["command"][demo["command"].index("--port") + 1] == "4001"

    assert services["ollama"]["profiles"] == ["local-model"] == services["ollama-pull"]["profiles"]
    local = [d for d in policies.deployments if d.provider == "ollama"]
    assert local and local[0].api_base == "http://ollama:11434/v1"
    assert services["ollama-pull"]["command"] == ["pull", local[0].upstream_model]
    assert services["ollama-pull"]["depends_on"]["ollama"]["condition"] == "service_healthy"   # no race
    assert services["ollama"]["healthcheck"]["test"] == ["CMD", "ollama", "list"]


def test_dockerfile_builds_the_gateway_from_files_that_exist() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines()
                    if line.strip() and not line.startswith((" ", "#"))]
    ops = [i[0] for i in instructions]
    assert ops[0] == "FROM" and "python:3.11" in instructions[0][1]
    for op, arg in instructions:
        if op == "COPY":
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    assert ["ENTRYPOINT", '["gateway"]'] in instructions and ["CMD", '["serve"]'] in instructions
    assert ["EXPOSE", "4000"] in instructions and "USER" in ops
    assert "GATEWAY_HOST=0.0.0.0" in text and "LITELLM_LOCAL_MODEL_COST_MAP=True" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "gateway" not in ignored and "policies" not in ignored and "tests" in ignored


# --------------------------------------------------------------------------------------- kubernetes

@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(manifests: list[dict[str, Any]], version: str) -> None:
    for doc in manifests:
        kubernetes_validate.validate(doc, version, strict=True)
    broken = json.loads(json.dumps(find(manifests, "Deployment", "gateway")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == "llm-gateway"
    assert kustomization["images"][0]["name"] == "llm-gateway"
    [admin] = kustomization["secretGenerator"]
    assert admin["name"] == "gateway-admin" and admin["envs"] == ["admin.env"]


@pytest.mark.e2e
def test_no_default_admin_key_ships_and_apply_refuses_without_a_generated_one(tmp_path: Path) -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "change-me" not in path.read_text(errors="replace"), path
    assert "deploy/kubernetes/admin.env" in (ROOT / ".gitignore").read_text().split()
    assert not (K8S / "admin.env").exists() or "admin.env" not in subprocess.run(
        ["git", "ls-files", "deploy/kubernetes"], capture_output=True, text=True, cwd=ROOT).stdout
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    copy = tmp_path / "kubernetes"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("admin.env"))
    refused = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "admin.env" in refused.stderr
    (copy / "admin.env").write_text("GATEWAY_MASTER_KEY=sk-admin-generated\n")
    built = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    [secret] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("gateway-admin")]
    deployment = find(docs, "Deployment", "gateway")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    master = next(e for e in container["env"] if e["name"] == "GATEWAY_MASTER_KEY")
    assert master["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]   # the hashed name
    assert container["image"] == "registry.example.com/llm-gateway:0.1.0"


def test_readme_says_to_build_and_push_the_image_before_kubectl_apply() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("kubectl apply -k deploy/kubernetes/") - 1500:][:3000]
    assert "docker build -f deploy/Dockerfile" in section and "docker push" in section
    assert "admin.env" in section and "newName" in section


@pytest.mark.e2e
def test_local_prometheus_config_scrapes_this_machine_with_the_same_rules(tmp_path: Path) -> None:
    local = DEPLOY / "prometheus" / "prometheus.local.yml"
    config = yaml.safe_load(local.read_text())
    shared = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == shared["rule_files"] == ["alerts.yml"]
    assert config["global"] == shared["global"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "llm-gateway" and job["static_configs"][0]["targets"] == ["127.0.0.1:4000"]
    readme = (ROOT / "README.md").read_text()
    assert "prometheus --config.file=deploy/prometheus/prometheus.local.yml" in readme
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH")
    result = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bench_readme_names_the_shared_harness_by_a_relative_path() -> None:
    text = (ROOT / "bench" / "README.md").read_text()
    assert "../shared/bench/" in text and "/work/" not in text


def test_gateway_deployment_replicas_probes_and_wiring(manifests: list[dict[str, Any]]) -> None:
    deployment = find(manifests, "Deployment", "gateway")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    args = container["args"]
    assert args[0] == "serve" and int(args[args.index("--port") + 1]) == ports["http"]
    assert int(args[args.index("--workers") + 1]) >= 2
    env = {e["name"]: e.get("value") for e in container["env"]}
    redis_host = re.match(r"redis://([^:/]+):(\d+)/", env["GATEWAY_REDIS_URL"])
    assert redis_host is not None
    redis_service = find(manifests, "Service", redis_host.group(1))
    assert redis_service["spec"]["ports"][0]["port"] == int(redis_host.group(2))
    statefulset = find(manifests, "StatefulSet", "redis")
    assert redis_service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    redis_args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "volatile-lru"
    limit = statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert memory_bytes(redis_args[redis_args.index("--maxmemory") + 1]) < memory_bytes(limit)
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"

    secret_name = container["envFrom"][0]["secretRef"]["name"]
    secret = find(manifests, "Secret", secret_name)
    assert {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"} <= set(secret["stringData"])
    assert "GATEWAY_MASTER_KEY" not in secret["stringData"]              # generated per cluster, see below
    master = next(e for e in container["env"] if e["name"] == "GATEWAY_MASTER_KEY")
    ref = master["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "gateway-admin" and ref["key"] == "GATEWAY_MASTER_KEY" and not ref.get("optional")

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert mounts["policies"] == env["GATEWAY_CONFIG_DIR"]
    assert mounts["tmp"] == "/tmp" and "emptyDir" in volumes["tmp"]       # workers' metric files, read-only root
    configmap = find(manifests, "ConfigMap", volumes["policies"]["configMap"]["name"])
    assert set(configmap["data"]) == {"models.yaml", "teams.yaml"}

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"] and annotations["prometheus.io/path"] == "/metrics"

    service = find(manifests, "Service", "gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ports

    hpa = find(manifests, "HorizontalPodAutoscaler", "gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert "cpu" in container["resources"]["requests"]                   # the HPA's utilisation needs a request


def test_policies_configmap_holds_valid_policies(manifests: list[dict[str, Any]], tmp_path: Path) -> None:
    configmap = find(manifests, "ConfigMap", "gateway-policies")
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text)
    policies = load_policies(str(tmp_path))
    assert "demo" in policies.models and "default" in policies.teams


@pytest.mark.e2e
def test_prometheus_scrapes_the_gateway_pods_with_the_same_rules(manifests: list[dict[str, Any]],
                                                                  tmp_path: Path) -> None:
    configmap = find(manifests, "ConfigMap", "prometheus-config")
    assert configmap["data"]["alerts.yml"] == (DEPLOY / "prometheus" / "alerts.yml").read_text()
    config = yaml.safe_load(configmap["data"]["prometheus.yml"])
    [job] = config["scrape_configs"]
    assert job["job_name"] == "llm-gateway"                               # what GatewayDown watches
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["llm-gateway"]
    keep = job["relabel_configs"][0]
    assert keep["action"] == "keep" and keep["regex"] == "true"
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    address = next(r for r in job["relabel_configs"] if r.get("target_label") == "__address__")
    regex = re.compile(address["regex"])
    match = regex.fullmatch("10.1.2.3:8080;4000")
    assert match is not None and address["replacement"].replace("${1}", match.group(1)).replace(
        "${2}", match.group(2)) == "10.1.2.3:4000"
    deployment = find(manifests, "Deployment", "prometheus")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "prometheus"
    role = find(manifests, "Role", "prometheus")
    assert "pods" in role["rules"][0]["resources"] and "list" in role["rules"][0]["verbs"]
    binding = find(manifests, "RoleBinding", "prometheus")
    assert binding["subjects"][0]["name"] == "prometheus" and binding["roleRef"]["name"] == "prometheus"
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert config["rule_files"] == [f"{mount}/alerts.yml"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not on PATH")
    # Debian's Prometheus is built without Kubernetes discovery: check the rest with a static target
    local = dict(config, rule_files=["alerts.yml"])
    local["scrape_configs"] = [{k: v for k, v in job.items() if k != "kubernetes_sd_configs"}
                               | {"static_configs": [{"targets": ["gateway:4000"]}]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local))
    (tmp_path / "alerts.yml").write_text(configmap["data"]["alerts.yml"])
    result = subprocess.run([promtool, "check", "config", "prometheus.yml"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ grafana

def test_grafana_datasource_points_at_the_stacks_prometheus() -> None:
    datasources = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [ds] = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus" and ds["isDefault"] is True
    assert ds["url"] == "http://prometheus:9090"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]
    prometheus_yml = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert ds["jsonData"]["timeInterval"] == prometheus_yml["global"]["scrape_interval"]


# --------------------------------------------------------------------------------------- clickhouse

def test_clickhouse_server_and_the_gateway_wired_to_it(compose: dict[str, Any],
                                                       manifests: list[dict[str, Any]]) -> None:
    from urllib.parse import urlparse
    services = compose["services"]
    ch, gw = services["clickhouse"], services["gateway"]
    url = urlparse(gw["environment"]["GATEWAY_CLICKHOUSE_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "clickhouse", 8123, "/gateway")
    assert url.username == ch["environment"]["CLICKHOUSE_USER"] and ch["environment"]["CLICKHOUSE_DB"] == "gateway"
    assert url.password == ch["environment"]["CLICKHOUSE_PASSWORD"]
    assert gw["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert "8123/ping" in " ".join(ch["healthcheck"]["test"])
    assert any(host_path(v)[1] == "/var/lib/clickhouse" for v in ch["volumes"])
    assert "'.[clickhouse]'" in (DEPLOY / "Dockerfile").read_text()       # the image has the client

    deployment = find(manifests, "Deployment", "gateway")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    k8s_url = urlparse(env["GATEWAY_CLICKHOUSE_URL"]["value"])
    assert k8s_url.password == "$(CLICKHOUSE_PASSWORD)"
    names = [e["name"] for e in container["env"]]
    assert names.index("CLICKHOUSE_PASSWORD") < names.index("GATEWAY_CLICKHOUSE_URL")   # $(...) needs it first
    service = find(manifests, "Service", k8s_url.hostname or "")
    assert service["spec"]["ports"][0]["port"] == k8s_url.port
    statefulset = find(manifests, "StatefulSet", "clickhouse")
    pod = statefulset["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [server] = pod["spec"]["containers"]
    server_env = {e["name"]: e for e in server["env"]}
    assert server_env["CLICKHOUSE_DB"]["value"] == k8s_url.path.strip("/")
    assert server_env["CLICKHOUSE_USER"]["value"] == k8s_url.username
    ref = server_env["CLICKHOUSE_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == env["CLICKHOUSE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "gateway-admin",
                                                                               "key": "CLICKHOUSE_PASSWORD"}
    assert server["volumeMounts"][0]["mountPath"] == "/var/lib/clickhouse"
    assert "CLICKHOUSE_PASSWORD=" in (K8S / "kustomization.yaml").read_text()


def test_grafana_clickhouse_datasource_and_dashboard_are_provisioned(compose: dict[str, Any]) -> None:
    [ds] = yaml.safe_load((ROOT / "grafana/provisioning/datasources/clickhouse.yml").read_text())["datasources"]
    assert ds["type"] == "grafana-clickhouse-datasource" and ds["uid"] == "clickhouse"
    assert (ds["jsonData"]["host"], ds["jsonData"]["port"]) == ("clickhouse", 8123)
    ch = compose["services"]["clickhouse"]["environment"]
    assert ds["jsonData"]["defaultDatabase"] == ch["CLICKHOUSE_DB"]
    assert ds["jsonData"]["username"] == ch["CLICKHOUSE_USER"]
    grafana = compose["services"]["grafana"]
    assert ds["secureJsonData"]["password"] == "$CLICKHOUSE_PASSWORD"
    assert "CLICKHOUSE_PASSWORD" in grafana["environment"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    [provider] = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/llm-gateway-clickhouse.yml").read_text()
                                )["providers"]
    mounts = {target: path for path, target in map(host_path, grafana["volumes"]) if path is not None}
    assert mounts[provider["options"]["path"]] == ROOT / "grafana" / "dashboards-clickhouse"
    boards = list((ROOT / "grafana" / "dashboards-clickhouse").glob("*.json"))
    assert boards
    for path in boards:
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == ds["uid"], (path.name, panel["title"])
