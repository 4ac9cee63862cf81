"""docker-compose.yml, the Dockerfile and the Kubernetes manifests, checked without Docker or a cluster.

Schema checks use the official schemas (the Compose spec schema vendored by check-jsonschema; the
Kubernetes OpenAPI schemas of kubernetes-validate; hadolint and BuildKit's parser for the
Dockerfile). The cross-file checks below catch what a schema cannot: a health check that asks the
wrong port, a router pointed at an engine name no profile defines, a grace period shorter than the
drain.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import dockerfile
import jsonpatch
import kubernetes_validate
import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
K8S = REPO / "deploy" / "kubernetes"
KVMESH_SERVICES = ("tokenizer", "router", "engine-0", "engine-1", "engine-0-cpu", "engine-1-cpu")
ENGINES = {"gpu": ("engine-0", "engine-1"), "cpu": ("engine-0-cpu", "engine-1-cpu")}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _seconds(duration: str) -> float:
    """Compose durations: '45s', '1m30s', '10m'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _console_scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


# ---- docker-compose.yml ----

def test_compose_matches_the_compose_spec_schema():
    out = subprocess.run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_schema_check_rejects_a_misspelt_key(tmp_path):
    """The schema check above can fail: a typo in a service key is reported."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:", 1))
    out = subprocess.run([BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "stop_grace_periods" in out.stdout


def test_compose_services_run_kvmesh_entrypoints_with_grpc_health_checks(compose):
    scripts = _console_scripts()
    for name in KVMESH_SERVICES:
        svc = compose["services"][name]
        assert svc["command"][0] in scripts, f"{name}: {svc['command']} is not a console script"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        port = svc["environment"]["KVMESH_PORT"]
        assert svc["environment"]["KVMESH_HOST"] == "0.0.0.0", f"{name} must listen beyond loopback"
        test = svc["healthcheck"]["test"]
        assert test == ["CMD", "kvmesh", "health", f"127.0.0.1:{port}"], f"{name}: {test}"
        # The drain (KVMESH_GRACE) must finish before Docker's SIGKILL.
        grace = float(svc["environment"]["KVMESH_GRACE"])
        assert _seconds(svc["stop_grace_period"]) >= grace + 10, f"{name}: stop_grace_period too short"
    from kvmesh.cli.main import SUBCOMMANDS
    assert "health" in SUBCOMMANDS


@pytest.mark.parametrize("profile", sorted(ENGINES))
def test_router_reaches_the_engines_and_waits_for_them_healthy(compose, profile):
    services = compose["services"]
    router = services["router"]
    names_in_profile = {}  # DNS name -> service, for the services enabled by this profile
    for name, svc in services.items():
        if "profiles" in svc and profile not in svc["profiles"]:
            continue
        names_in_profile[name] = name
        for alias in (svc.get("networks") or {}).get("default", {}).get("aliases", []):
            names_in_profile[alias] = name
    engine_hosts = [t.rsplit(":", 1)[0] for t in router["environment"]["KVMESH_ENGINES"].split(",")]
    assert sorted(names_in_profile[h] for h in engine_hosts) == sorted(ENGINES[profile])
    assert router["environment"]["KVMESH_TOKENIZER"].split(":")[0] in names_in_profile
    for engine in ENGINES[profile]:
        assert profile in services[engine]["profiles"]
        assert router["depends_on"][engine]["condition"] == "service_healthy"
        assert router["depends_on"][engine]["required"] is False  # the other profile's engines are absent
    assert router["depends_on"]["tokenizer"] == {"condition": "service_healthy"}


def test_gpu_engines_reserve_one_distinct_gpu_each(compose):
    ids = []
    for name in ENGINES["gpu"]:
        svc = compose["services"][name]
        assert svc["environment"]["KVMESH_DEVICE"] == "cuda"
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        ids += device["device_ids"]
    assert len(set(ids)) == len(ids) == 2
    for name in ENGINES["cpu"]:
        svc = compose["services"][name]
        assert svc["environment"]["KVMESH_DEVICE"] == "cpu" and "deploy" not in svc


def test_traces_flow_to_the_collector_and_on_to_jaeger(compose):
    services = compose["services"]
    for name in KVMESH_SERVICES:
        env = services[name]["environment"]
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", env["OTEL_EXPORTER_OTLP_ENDPOINT"]).groups()
        assert host in services and port == "4317"
        assert env["OTEL_SERVICE_NAME"].startswith("kvmesh-")
    collector = services["otel-collector"]
    (mount,) = collector["volumes"]
    source, target = mount.split(":")[:2]
    assert f"--config={target}" in collector["command"]
    config = yaml.safe_load((REPO / source).read_text())
    assert "otlp" in config["service"]["pipelines"]["traces"]["receivers"]
    (exporter,) = config["service"]["pipelines"]["traces"]["exporters"]
    assert config["exporters"][exporter]["endpoint"].split(":")[0] in services  # jaeger
    scraped = {t.split(":")[0] for job in config["receivers"]["prometheus"]["config"]["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]}
    assert scraped == {"router", "tokenizer", "engine-0", "engine-1"}
    assert "16686:16686" in services["jaeger"]["ports"]  # the UI the README points at


def test_model_volume_is_mounted_where_engines_and_tokenizer_look(compose):
    for name in ("tokenizer", *ENGINES["gpu"], *ENGINES["cpu"]):
        svc = compose["services"][name]
        assert any(v.endswith(":/models:ro") for v in svc["volumes"]), name
        assert svc["environment"]["KVMESH_MODEL"] == "${KVMESH_COMPOSE_MODEL:-demo}"


# ---- settings: every KVMESH_* variable is a flag of the tier that gets it (a typo would be ignored) ----

def _parsers() -> dict[str, object]:
    """console script -> the service's parser builder (engine_svc.server imports torch: a few s).

    A builder, because EnvArgumentParser reads KVMESH_* when the flags are added."""
    import engine_svc.server
    import router.server
    import tokenizer_svc.server
    return {"kvmesh-tokenizer": tokenizer_svc.server.build_parser, "kvmesh-engine": engine_svc.server.build_parser,
            "kvmesh-router": router.server.build_parser}


def _env_names(build_parser) -> set[str]:
    from kvmesh.serving.config import env_name
    return {env_name(o) for a in build_parser()._actions for o in a.option_strings if o.startswith("--")}


def _check_env(where: str, build_parser, env: dict[str, str], monkeypatch) -> None:
    unknown = {k for k in env if k.startswith("KVMESH_")} - _env_names(build_parser)
    assert not unknown, f"{where}: {sorted(unknown)} are no flags of {build_parser().prog}"
    with monkeypatch.context() as m:  # and the values parse (types, choices, required flags)
        for key in [k for k in os.environ if k.startswith("KVMESH_")]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value)))
        args = build_parser().parse_args([])
        if build_parser().prog == "kvmesh-router":  # the router also validates its targets and limits
            from router.config import config_from_args
            config_from_args(args)


def test_compose_settings_are_flags_of_their_service(compose, monkeypatch):
    parsers = _parsers()
    for name in KVMESH_SERVICES:
        svc = compose["services"][name]
        _check_env(name, parsers[svc["command"][0]], svc["environment"], monkeypatch)


def test_kubernetes_settings_are_flags_of_their_tier(monkeypatch):
    parsers = _parsers()
    shared = _by_kind("ConfigMap")["kvmesh-config"]["data"]
    known = set().union(*(_env_names(p) for p in parsers.values()))
    assert not {k for k in shared if k.startswith("KVMESH_")} - known, "ConfigMap variable no tier reads"
    for name, deployment in _by_kind("Deployment").items():
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        parser = parsers[c["command"][0]]
        own = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
        assert not {k for k in own if k.startswith("KVMESH_")} - _env_names(parser), name
        tier_env = {k: v for k, v in shared.items() if k in _env_names(parser) or not k.startswith("KVMESH_")}
        _check_env(name, parser, {**tier_env, **own}, monkeypatch)


# ---- Dockerfile ----

def test_dockerfile_passes_hadolint():
    out = subprocess.run([BIN / "hadolint", str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _dockerignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or path.startswith(p.rstrip("/") + "/")
               or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_dockerfile_is_multistage_slim_and_non_root():
    cmds = dockerfile.parse_file(str(DOCKERFILE))
    froms = [c for c in cmds if c.cmd == "FROM"]
    stages = [f.value[-1] for f in froms]
    assert {"build", "runtime"} <= set(stages) and stages[-1] == "runtime"
    final = cmds[cmds.index(froms[-1]):]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime stage must drop root"
    # The runtime stage copies the built venv only: no sources, no build tools installed there.
    assert [c.value for c in final if c.cmd == "COPY"] == [("/opt/kvmesh", "/opt/kvmesh")]
    assert all("--from=build" in c.flags for c in final if c.cmd == "COPY")
    # Every COPY source from the build context exists and survives .dockerignore.
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for c in cmds:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: missing"
                assert not _dockerignored(src.rstrip("/"), ignore), f"COPY {src}: excluded by .dockerignore"
    # Every package setuptools installs is copied in.
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = {src.rstrip("/") for c in cmds if c.cmd == "COPY" for src in c.value[:-1]}
    assert {p.rstrip("*") for p in includes["include"]} <= copied


def test_the_build_context_installs_every_module_and_entrypoint(tmp_path):
    """What the image's `pip install .` gets: the Dockerfile's COPY sources minus .dockerignore, built
    into a wheel. Every tracked module must be in it (a folder without __init__.py is importable in the
    editable checkout but missing from the wheel), and so must the three entrypoints."""
    cmds = dockerfile.parse_file(str(DOCKERFILE))
    context = tmp_path / "context"
    context.mkdir()
    for c in cmds:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                copy = shutil.copytree if (REPO / src).is_dir() else shutil.copy
                copy(REPO / src, context / src, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                  if (REPO / src).is_dir() else {}))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("kvmesh-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    packages = ["kvmesh", "tokenizer_svc", "engine_svc", "router", "kernels"]
    tracked = subprocess.run(["git", "ls-files", "--", *(f"{p}/*.py" for p in packages)], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked and not set(tracked) - names, f"not in the image: {sorted(set(tracked) - names)}"
    for script in ("kvmesh", "kvmesh-tokenizer", "kvmesh-engine", "kvmesh-router"):
        assert f"\n{script} = " in "\n" + scripts, script


# ---- Kubernetes ----

def _manifests() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [(name, d) for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


@pytest.mark.parametrize("version", ["1.27.0", "1.37.0"])  # 1.27: native gRPC probes are GA
def test_manifests_validate_against_the_kubernetes_api(version):
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}, "file not in kustomization"
    for name, doc in _manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']} on {version}: {exc.message} at {exc.path}")


def test_manifest_validation_rejects_an_unknown_field():
    (doc,) = [d for _, d in _manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "engine"]
    doc["spec"]["replicaz"] = doc["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_cpu_overlay_moves_the_engines_off_gpus():
    """deploy/kubernetes/cpu: the base with its JSON patches applied (RFC 6902, as kustomize applies them)."""
    overlay = yaml.safe_load((K8S / "cpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    docs = [d for _, d in _manifests()]
    for entry in overlay["patches"]:
        target = entry["target"]
        matches = [i for i, d in enumerate(docs)
                   if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(matches) == 1, target
        docs[matches[0]] = jsonpatch.apply_patch(docs[matches[0]], yaml.safe_load(entry["patch"]))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    (engine,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "engine"]
    assert "nvidia.com/gpu" not in json.dumps(engine)
    (c,) = engine["spec"]["template"]["spec"]["containers"]
    assert {"name": "KVMESH_DEVICE", "value": "cpu"} in c["env"] and c["image"] == "kvmesh:cpu"


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _manifests() if d["kind"] == kind}


def test_engines_use_gpus_grpc_probes_and_a_headless_service():
    engine = _by_kind("Deployment")["engine"]
    (c,) = engine["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051, probe
    svc = _by_kind("Service")["engines"]
    assert svc["spec"]["clusterIP"] == "None" and not svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"].items() <= engine["spec"]["template"]["metadata"]["labels"].items()
    router = _by_kind("Deployment")["router"]
    (rc,) = router["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in rc["env"]}
    assert env["KVMESH_ENGINES"] == "dns:///engines:50051"
    assert env["KVMESH_TOKENIZER"].split(":")[0] in _by_kind("Service")


def test_every_tier_drains_before_it_is_killed():
    grace = float(_by_kind("ConfigMap")["kvmesh-config"]["data"]["KVMESH_GRACE"])
    for name, deployment in _by_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["command"][0] in _console_scripts()
        assert {"configMapRef": {"name": "kvmesh-config"}} in c["envFrom"]
        pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        # preStop wait, then SIGTERM and the drain, all within the grace period.
        assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + 5, name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["readinessProbe"]["grpc"]["port"] == int(
            _by_kind("ConfigMap")["kvmesh-config"]["data"]["KVMESH_PORT"])
