"""The deployment files agree with the code: every file under deploy/ and docs/operations.md is parsed
and compared with the real CLI parser, the real config builder, the health service name and the store
codec, never with constants repeated here. No container engine or cluster is used."""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, fields
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OPERATIONS = ROOT / "docs" / "operations.md"
GiB = 1 << 30


# -- reading the files ------------------------------------------------------------------------------


@functools.cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and pending):
            continue
        if not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "deploy/Dockerfile ends inside a continuation line"
    return tuple(instructions)


def final_stage() -> list[tuple[str, str]]:
    instructions = list(dockerfile())
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env = {}
    for word, rest in final_stage():
        if word == "ENV":
            for pair in shlex.split(rest):
                name, sep, value = pair.partition("=")
                assert sep, f"ENV {rest!r}: use NAME=value"
                env[name] = value
    return env


def image_exec(word: str) -> list[str]:
    (rest,) = [rest for w, rest in final_stage() if w == word]
    return json.loads(rest)


def image_user() -> str:
    return [rest for word, rest in final_stage() if word == "USER"][-1]


def run_commands() -> list[tuple[int, list[str]]]:
    """(instruction index, argv) of every `kvblend ...` inside a RUN of the final stage."""
    found = []
    for index, (word, rest) in enumerate(final_stage()):
        if word == "RUN":
            for segment in re.split(r"&&|\|\||;", rest):
                argv = shlex.split(segment)
                if argv and argv[0] == "kvblend":
                    found.append((index, argv))
    return found


@functools.cache
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_replicas() -> dict[str, dict]:
    return {name: s for name, s in compose()["services"].items()
            if str(s.get("image", "")).startswith("kvblend") and s.get("command", [None])[0] == "serve"}


def compose_redis() -> tuple[str, dict]:
    (found,) = [(n, s) for n, s in compose()["services"].items() if str(s.get("image", "")).startswith("redis")]
    return found


@functools.cache
def k8s_documents() -> tuple[dict, ...]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return tuple(documents)


def k8s(kind: str, name: str | None = None) -> list[dict]:
    return [d for d in k8s_documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def workload_container(image_prefix: str) -> tuple[dict, dict]:
    """(workload, container) of the one Deployment/StatefulSet container whose image starts so."""
    (found,) = [(w, c) for w in k8s("Deployment") + k8s("StatefulSet")
                for c in w["spec"]["template"]["spec"]["containers"] if c["image"].startswith(image_prefix)]
    return found


def config_map_file(pod_spec: dict, mounts: list[dict], path: str) -> str:
    """The text of the ConfigMap key that a container sees at `path`."""
    wanted = PurePosixPath(path)
    for mount in mounts:
        if wanted.parent == PurePosixPath(mount["mountPath"]):
            (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
            assert "configMap" in volume, f"{path} is mounted from {volume}, not a ConfigMap"
            items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])} or None
            key = items[wanted.name] if items else wanted.name
            (config_map,) = k8s("ConfigMap", volume["configMap"]["name"])
            return config_map["data"][key]
    raise AssertionError(f"no volume is mounted at {wanted.parent} (for {path})")


def operations_doc() -> str:
    return OPERATIONS.read_text()


def doc_commands() -> list[list[str]]:
    """argv of every line starting with `kvblend ` inside a shell code block of docs/operations.md."""
    blocks = re.findall(r"```sh\n(.*?)```", operations_doc(), flags=re.S)
    return [shlex.split(line.strip(), comments=True) for block in blocks for line in block.splitlines()
            if line.strip().startswith("kvblend ")]


# -- the code's view ---------------------------------------------------------------------------------


@functools.cache
def cli() -> argparse.ArgumentParser:
    from services.commands.cli import build_parser

    return build_parser()


def parse(argv: list[str], where: str) -> argparse.Namespace:
    """Parse with the real `kvblend` parser; every --flag must be one the subcommand defines in full
    (argparse would accept an abbreviation)."""
    assert argv and argv[0] == "kvblend", f"{where}: {argv} does not run kvblend"
    (subparsers,) = [a for a in cli()._actions if isinstance(a, argparse._SubParsersAction)]
    sub = subparsers.choices.get(argv[1])
    assert sub is not None, f"{where}: unknown kvblend command {argv[1]!r}"
    for token in argv[2:]:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in sub._option_string_actions, f"{where}: `kvblend {argv[1]}` has no flag {flag}"
    try:
        return cli().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: the kvblend parser refuses {shlex.join(argv)}")


def settings_of(argv: list[str], environ: dict, where: str, config_text: str | None = None,
                tmp_path: Path | None = None):
    """What `kvblend serve` would run with: the real `services.commands.serve.settings_from_args`."""
    from services.commands.serve import settings_from_args

    args = parse(argv, where)
    assert args.command == "serve", f"{where}: {argv} is not `kvblend serve`"
    if args.config is not None:
        assert config_text is not None, f"{where}: --config {args.config} has no content to test"
        local = tmp_path / PurePosixPath(args.config).name
        local.write_text(config_text)
        args.config = str(local)
    return settings_from_args(args, environ=environ)


def image_settings():
    return settings_of(image_exec("ENTRYPOINT") + image_exec("CMD"), image_env(), "Dockerfile CMD")


def compose_settings(name: str):
    service = compose_replicas()[name]
    environ = {**image_env(), **dict(service.get("environment") or {})}
    return settings_of(image_exec("ENTRYPOINT") + service["command"], environ, f"compose {name}")


def k8s_settings(tmp_path: Path):
    workload, container = workload_container("kvblend")
    argv = container.get("command", image_exec("ENTRYPOINT")) + container.get("args", [])
    environ = {**image_env(), **{e["name"]: e["value"] for e in container.get("env", [])}}
    config = None
    if "--config" in argv:
        config = config_map_file(workload["spec"]["template"]["spec"], container.get("volumeMounts", []),
                                 argv[argv.index("--config") + 1])
    return settings_of(argv, environ, "k8s Deployment", config, tmp_path)


def k8s_quantity(text) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units.get(unit, 1)


def redis_quantity(text: str) -> int:
    units = {"": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}
    number, unit = re.fullmatch(r"(\d+)([a-z]*)", text.lower()).groups()
    return int(number) * units[unit]


def redis_options(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "redis-server", f"{argv} does not start redis-server"
    options, rest = {}, argv[1:]
    while rest:
        flag, value, *rest = rest
        assert flag.startswith("--"), f"redis-server argument {flag!r} is not --name value"
        options[flag[2:]] = value
    return options


def docker_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)", str(text).lower()).groups()
    return int(number) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


def seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(s|m)", text).groups()
    return float(number) * (60 if unit == "m" else 1)


def published(ports: list[str]) -> dict[int, int]:
    """compose "HOST:CONTAINER" port strings -> {container port: host port}."""
    pairs = [str(p).rsplit(":", 1) for p in ports]
    return {int(container): int(host) for host, container in pairs}


# -- the image ---------------------------------------------------------------------------------------


def test_image_runs_kvblend_serve_on_all_interfaces_and_exposes_its_two_ports():
    """ENTRYPOINT is `kvblend`; the CMD is a `kvblend serve` the real parser takes; what it would
    listen on (gRPC and metrics) is exactly what EXPOSE declares."""
    assert image_exec("ENTRYPOINT") == ["kvblend"]
    settings = image_settings()
    exposed = {int(p.split("/")[0]) for w, rest in final_stage() if w == "EXPOSE" for p in rest.split()}
    assert settings.server.host == "0.0.0.0"
    assert settings.server.metrics_port != 0, "the image serves no metrics (--metrics-port 0)"
    assert settings.server.metrics_host == "0.0.0.0", "the image's metrics listen on loopback only"
    assert exposed == {settings.server.port, settings.server.metrics_port}


def test_every_kvblend_command_line_parses_with_the_real_parser(tmp_path):
    """Dockerfile CMD and RUN lines, compose commands, the k8s container and docs/operations.md's shell
    lines: each is accepted by services.commands.cli.build_parser() and uses only flags its subcommand defines."""
    lines = [("Dockerfile CMD", image_exec("ENTRYPOINT") + image_exec("CMD"))]
    lines += [("Dockerfile RUN", argv) for _, argv in run_commands()]
    for name, service in compose()["services"].items():
        if str(service.get("image", "")).startswith("kvblend"):
            entrypoint = service.get("entrypoint", image_exec("ENTRYPOINT"))
            lines.append((f"compose {name}", entrypoint + service["command"]))
    _, container = workload_container("kvblend")
    lines.append(("k8s Deployment", container.get("command", image_exec("ENTRYPOINT")) + container["args"]))
    lines += [("docs/operations.md", argv) for argv in doc_commands()]
    sources = {where.split()[0] for where, _ in lines}
    assert sources == {"Dockerfile", "compose", "k8s", "docs/operations.md"}, sources
    for where, argv in lines:
        parse(argv, where)


def test_torch_is_pinned_to_pyprojects_release_in_both_variants():
    """pyproject.toml's torch pin is the one the image installs, from the CPU index for the CPU variant
    and from PyPI (the CUDA build) otherwise; stages base-cpu and base-cuda exist for VARIANT."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.split("==")[1] for d in dependencies if re.match(r"torch\s*==", d)]
    text = (DEPLOY / "Dockerfile").read_text()
    installs = [rest for word, rest in final_stage() if word == "RUN" and "torch==" in rest]
    assert len(installs) == 1 and re.findall(r"torch==([\w.+]+)", installs[0]) == [pin, pin]
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs[0]
    assert set(re.findall(r"torch==([\w.+]+)", operations_doc())) == {pin}
    stages = {rest.split(" AS ")[1] for word, rest in dockerfile() if word == "FROM" and " AS " in rest}
    assert {"base-cpu", "base-cuda"} <= stages
    (default,) = re.findall(r"^ARG VARIANT=(\w+)$", text, flags=re.M)
    assert f"base-{default}" in stages and final_stage()[0] == ("FROM", "base-${VARIANT}")


def test_image_converts_the_served_model_at_build_time_into_the_cache_serve_reads(monkeypatch):
    """A RUN `kvblend generate` after ENV KVBLEND_CACHE_DIR converts the model that serve loads (same
    spec) into the cache dir serve reads, so a replica does not convert at start."""
    from services.commands.options import model_config

    env_index = min(i for i, (w, rest) in enumerate(final_stage()) if w == "ENV" and "KVBLEND_CACHE_DIR=" in rest)
    warmups = [(i, argv) for i, argv in run_commands() if argv[1] == "generate"]
    assert warmups, "the image never loads the model at build time"
    index, argv = warmups[0]
    assert index > env_index, "the model is converted before KVBLEND_CACHE_DIR is set"
    monkeypatch.setenv("KVBLEND_CACHE_DIR", image_env()["KVBLEND_CACHE_DIR"])
    warm = model_config(parse(argv, "Dockerfile RUN"))
    served = image_settings().model
    assert (warm.spec, warm.cache_dir) == (served.spec, served.cache_dir)


def test_build_context_admits_exactly_what_the_image_copies():
    """Dockerfile.dockerignore allows pyproject.toml and the packages pip installs, and every COPY
    source is allowed and exists."""
    lines = [s.strip() for s in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()]
    allowed = {s[1:].rstrip("/") for s in lines if s.startswith("!")}
    assert "*" in lines
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {name.rstrip("*") for name in include}
    assert allowed == {"pyproject.toml", *packages}
    copied = [shlex.split(rest)[:-1] for word, rest in final_stage() if word == "COPY"]
    for sources in copied:
        for source in sources:
            assert source.rstrip("/") in allowed and (ROOT / source).exists(), f"COPY {source}"
    assert {s.rstrip("/") for sources in copied for s in sources} == allowed


def test_image_and_pods_run_as_a_non_root_user():
    """The image's USER is a numeric non-zero uid, and the k8s pod runs as that uid with runAsNonRoot."""
    user = image_user()
    assert user.isdigit() and int(user) != 0
    workload, _ = workload_container("kvblend")
    context = workload["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] == int(user)


def test_env_names_set_for_kvblend_are_read_by_the_code():
    """Each variable the image, compose or k8s sets for kvblend (PATH aside, which holds the venv)
    changes what `kvblend serve` builds: none is a dead setting."""
    from services.commands.serve import settings_from_args

    names = set(image_env())
    for service in compose_replicas().values():
        names |= set(dict(service.get("environment") or {}))
    _, container = workload_container("kvblend")
    names |= {e["name"] for e in container.get("env", [])}
    assert image_env()["PATH"].startswith("/opt/venv/bin:")
    names.discard("PATH")
    assert names
    args = parse(["kvblend", "serve", "--device", "cpu"], "probe")
    plain = settings_from_args(args, environ={})
    for name in names:
        assert settings_from_args(args, environ={name: f"/probe/{name}"}) != plain, f"{name} is not read"


# -- compose -----------------------------------------------------------------------------------------


def test_compose_replicas_share_the_redis_service_and_publish_their_ports():
    """Two replicas with the redis catalog (write-through on), a Redis URL naming the compose Redis
    service on its port, started after Redis is healthy, container ports = the serve ports, their own
    data volume at the data dir, and no volume over the model cache."""
    redis_name, redis = compose_redis()
    replicas = compose_replicas()
    assert len(replicas) >= 2
    volumes = []
    for name, service in replicas.items():
        settings = compose_settings(name)
        assert settings.server.catalog == "redis" and settings.store.write_through
        url = urlparse(settings.store.redis_url)
        assert (url.hostname, url.port or 6379) == (redis_name, int(redis_options(redis["command"]).get("port", 6379)))
        assert service["depends_on"][redis_name]["condition"] == "service_healthy" and "healthcheck" in redis
        ports = published(service["ports"])
        assert set(ports) == {settings.server.port, settings.server.metrics_port}
        assert settings.server.metrics_host == "0.0.0.0", f"{name}: the published metrics listen on loopback"
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        assert mounts.get(str(settings.server.data_dir)), f"{name}: no volume at {settings.server.data_dir}"
        assert not any(Path(settings.model.cache_dir).is_relative_to(m) for m in mounts)
        volumes.append(mounts[str(settings.server.data_dir)])
        assert seconds(service["stop_grace_period"]) >= settings.server.drain_s + 5
    assert len(set(volumes)) == len(volumes), "two replicas share one data volume (one sqlite mirror)"
    assert len({port for s in replicas.values() for port in published(s["ports"]).values()}) == 2 * len(replicas)


def test_compose_healthcheck_passes_only_while_chunkcache_is_serving():
    """The replicas' healthcheck command, run against a real grpc.health.v1 server on the port the
    replica serves: exit 0 when kvblend.v1.ChunkCache (services.serving.server.SERVICE) is SERVING and only
    that name is set, non-zero when it is NOT_SERVING or UNKNOWN or nothing listens."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from services.serving.server import SERVICE

    commands = {tuple(s["healthcheck"]["test"]) for s in compose_replicas().values()}
    (command,) = commands
    assert command[0] == "CMD" and command[1] in ("python", "python3") and command[2] == "-c"
    code = command[3]
    (port,) = re.findall(r"['\"](?:127\.0\.0\.1|localhost):(\d+)['\"]", code)
    assert {int(port)} == {compose_settings(name).server.port for name in compose_replicas()}

    servicer = health.HealthServicer()
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    test_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    probe = code.replace(f":{port}", f":{test_port}")

    def status() -> int:
        return subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, timeout=60).returncode

    try:
        servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        assert status() == 0
        for other in (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.UNKNOWN):
            servicer.set(SERVICE, other)
            assert status() != 0
    finally:
        server.stop(None).wait()
    assert status() != 0


def test_compose_client_round_robins_over_every_replica():
    """The client's --server list names each replica service at its gRPC port."""
    clients = [s for s in compose()["services"].values() if s.get("command", [None])[0] == "query"]
    assert clients
    args = parse(["kvblend", *clients[0]["command"]], "compose client")
    targets = args.server.split(",")
    expected = {f"{name}:{compose_settings(name).server.port}" for name in compose_replicas()}
    assert sorted(targets) == sorted(expected)


# -- Redis -------------------------------------------------------------------------------------------


def test_redis_persists_never_evicts_and_has_room_above_maxmemory():
    """Compose and k8s Redis: appendonly yes, maxmemory-policy noeviction, a maxmemory, a memory limit
    at least 1.25x maxmemory (fork copy-on-write, buffers), data on a volume; k8s: PVC >= 2x maxmemory
    (AOF rewrite writes a new base file beside the old)."""
    _, redis = compose_redis()
    options = redis_options(redis["command"])
    assert options["appendonly"] == "yes" and options["maxmemory-policy"] == "noeviction"
    assert docker_bytes(redis["mem_limit"]) >= 1.25 * redis_quantity(options["maxmemory"])
    assert any(v.endswith(":" + options.get("dir", "/data")) for v in redis["volumes"])

    workload, container = workload_container("redis")
    assert workload["kind"] == "StatefulSet"
    options = redis_options(container.get("command", []) + container["args"])
    assert options["appendonly"] == "yes" and options["maxmemory-policy"] == "noeviction"
    maxmemory = redis_quantity(options["maxmemory"])
    assert k8s_quantity(container["resources"]["limits"]["memory"]) >= 1.25 * maxmemory
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == options["dir"]]
    (claim,) = [c for c in workload["spec"]["volumeClaimTemplates"] if c["metadata"]["name"] == mount["name"]]
    assert k8s_quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 2 * maxmemory


# -- Kubernetes --------------------------------------------------------------------------------------


def test_k8s_configmap_builds_through_the_real_config_code(tmp_path):
    """serve.toml in the ConfigMap parses with serve_config.read_file and builds with the Deployment's
    args: Redis catalog (write-through), the device given explicitly, the data dir on the pod volume."""
    from services import settings as serve_config

    workload, container = workload_container("kvblend")
    argv = container["args"]
    text = config_map_file(workload["spec"]["template"]["spec"], container["volumeMounts"],
                           argv[argv.index("--config") + 1])
    (tmp_path / "serve.toml").write_text(text)
    assert "device" in serve_config.read_file(tmp_path / "serve.toml")["model"]
    settings = k8s_settings(tmp_path)
    assert settings.server.catalog == "redis" and settings.store.write_through
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert str(settings.server.data_dir) in mounts, f"data dir {settings.server.data_dir} is not a volume"
    assert not any(Path(settings.model.cache_dir).is_relative_to(m) for m in mounts)


def test_k8s_ports_probes_annotations_and_services_agree_with_the_config(tmp_path):
    """containerPorts, the three grpc probes, the Prometheus annotations and every Service selecting
    the pods use the gRPC and metrics ports serve.toml sets; a headless Service exists for round robin."""
    settings = k8s_settings(tmp_path)
    workload, container = workload_container("kvblend")
    pod = workload["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.server.port, "metrics": settings.server.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.server.port, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.server.metrics_port)
    assert settings.server.metrics_host == "0.0.0.0", "the scraped metrics listen on loopback only"
    services = [s for s in k8s("Service") if s["spec"]["selector"].items() <= pod["metadata"]["labels"].items()]
    assert any(s["spec"].get("clusterIP") == "None" for s in services), "no headless Service"
    for service in services:
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = ports[target] if isinstance(target, str) else target
            assert number in ports.values() and port["port"] == number, (service["metadata"]["name"], port)


def test_k8s_probes_ask_for_the_services_the_server_reports():
    """Readiness and startup ask for services.serving.server.SERVICE; liveness for "" or SERVICE, the names the
    server sets SERVING at start."""
    from services.serving.server import SERVICE

    _, container = workload_container("kvblend")
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE
    assert container["startupProbe"]["grpc"]["service"] == SERVICE
    assert container["livenessProbe"]["grpc"].get("service", "") in ("", SERVICE)


def test_k8s_redis_url_names_the_redis_service_and_its_port(tmp_path):
    """The host of store.redis_url is a Service selecting the Redis StatefulSet's pods, and its port is
    that Service's port, which leads to the Redis container's port."""
    url = urlparse(k8s_settings(tmp_path).store.redis_url)
    workload, container = workload_container("redis")
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (service,) = k8s("Service", url.hostname)
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == (url.port or 6379)]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = port["targetPort"]
    assert (ports[target] if isinstance(target, str) else target) == int(
        redis_options(container["args"]).get("port", 6379))


def test_k8s_termination_grace_covers_prestop_and_drain(tmp_path):
    """terminationGracePeriodSeconds >= preStop sleep + server.drain_s + 5 s, so calls in flight finish
    before SIGKILL."""
    settings = k8s_settings(tmp_path)
    workload, container = workload_container("kvblend")
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(command[1]) + settings.server.drain_s + 5


def test_k8s_health_checks_cannot_starve_behind_queued_calls(tmp_path):
    """Every queued or streaming call and every ingest holds an RPC thread and health checks share the
    pool, so rpc_threads > max_waiting + max_active + max_ingest_calls keeps the probes answered under a
    full queue with every ingest place held."""
    server = k8s_settings(tmp_path).server
    assert server.rpc_threads > server.max_waiting + server.max_active + server.max_ingest_calls


def test_k8s_store_budgets_fit_the_pod(tmp_path):
    """cpu_bytes leaves >= 2 GiB of the memory limit to the model, torch and the mirror; a disk tier
    inside the data emptyDir leaves >= 1 GiB of its sizeLimit, which the ephemeral-storage limit covers."""
    settings = k8s_settings(tmp_path)
    workload, container = workload_container("kvblend")
    limits = container["resources"]["limits"]
    assert settings.store.cpu_bytes + 2 * GiB <= k8s_quantity(limits["memory"])
    (data,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == settings.server.data_dir]
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == data["name"]]
    size = k8s_quantity(volume["emptyDir"]["sizeLimit"])
    if settings.store.disk_path is not None:
        assert settings.store.disk_path.is_relative_to(settings.server.data_dir)
        assert settings.store.disk_bytes + GiB <= size
    assert k8s_quantity(limits["ephemeral-storage"]) >= size


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


# -- docs/operations.md ------------------------------------------------------------------------------


def doc_table(marker: str) -> list[list[str]]:
    """Rows (cells stripped; header and rule dropped) of the first table after the first `marker`."""
    text = operations_doc()
    assert marker in text, f"docs/operations.md has no {marker!r}"
    rows = []
    for line in text[text.index(marker):].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def test_config_reference_lists_every_field_with_its_default():
    """Each section's table in docs/operations.md has exactly its dataclass's fields, and each default
    is the code's (two documented exceptions checked against what `build` does)."""
    from services import settings as serve_config
    from services.settings import ModelConfig
    from store.config import StoreConfig

    sections = {"server": serve_config.ServerConfig, "model": ModelConfig, "store": StoreConfig,
                "guard": serve_config.GuardConfig, "auth": serve_config.AuthConfig, "tls": serve_config.TlsConfig}
    assert set(sections) == set(serve_config.ServeSettings.__dataclass_fields__)
    built = serve_config.build({}, {})
    for section, cls in sections.items():
        rows = {r[0].strip("`"): r[1] for r in doc_table(f"### `[{section}]`")}
        assert set(rows) == {f.name for f in fields(cls)}, f"[{section}]: doc and {cls.__name__} differ"
        for f in fields(cls):
            cell = rows[f.name]
            code = f.default if f.default is not MISSING else f.default_factory()
            if (section, f.name) == ("model", "device"):
                assert "cuda" in cell and "cpu" in cell
                import torch

                assert built.model.device == ("cuda" if torch.cuda.is_available() else "cpu")
                continue
            if (section, f.name) == ("store", "disk_path"):
                assert cell == "`data_dir/kv`" and built.store.disk_path == built.server.data_dir / "kv"
                continue
            doc = None if cell == "unset" else tomllib.loads(f"v = {cell.strip('`')}")["v"]
            if isinstance(code, Path):
                assert Path(doc).expanduser() == code.expanduser(), f"[{section}] {f.name}"
            elif isinstance(code, tuple):
                assert tuple(doc.items()) == code, f"[{section}] {f.name}"
            else:
                assert doc == code and type(doc) is type(code), f"[{section}] {f.name}: doc {doc!r}, code {code!r}"


def test_sizing_table_matches_the_store_codec():
    """Bytes per token in docs/operations.md are what store.codec stores for a layer entry
    [T, 2, kv_heads, head_dim] (fp32, bf16, int8 with scales), times the layers; MiB per chunk use
    ServerConfig.chunk_tokens; the 100k-chunk totals follow within 1%."""
    import torch

    from services.settings import ServerConfig
    from store.codec import encode

    def stored(layers, heads, dim, dtype, quantize) -> int:
        one, two = (len(encode(torch.ones(t, 2, heads, dim, dtype=dtype), quantize)) for t in (1, 2))
        return layers * (two - one)

    chunk = ServerConfig().chunk_tokens
    rows = doc_table("KV bytes per token")
    assert {r[0] for r in rows} >= {"SmolLM2-135M", "Llama-3-8B", "Mistral-7B", "Qwen2-7B"}
    per_chunk = {}
    for name, layers, heads, dim, *figures in rows:
        layers, heads, dim = int(layers), int(heads), int(dim)
        expected = [stored(layers, heads, dim, torch.float32, False), stored(layers, heads, dim, torch.bfloat16, False),
                    stored(layers, heads, dim, torch.bfloat16, True)]
        assert [int(f.replace(",", "")) for f in figures[:3]] == expected, name
        assert expected[:2] == [2 * layers * heads * dim * b for b in (4, 2)]
        mib = [b * chunk / 2**20 for b in expected]
        assert [float(f) for f in figures[3:]] == [round(m, 2) for m in mib], name
        per_chunk[name] = mib
    for name, *totals in doc_table("SmolLM2's 22.50 MiB"):
        model = name.split(",")[0]
        for text, mib in zip(totals, per_chunk[model], strict=True):
            assert abs(float(text.removesuffix(" TiB")) - mib * 100_000 / 2**20) <= 0.01 * mib * 100_000 / 2**20


def test_sizing_table_shape_of_smollm2_is_the_embedded_models():
    """The SmolLM2-135M row's layers, KV heads and head dim are those of the embedded model's config."""
    import json as json_

    from blend.loader import resolve
    from services.settings import ModelConfig

    config = json_.loads((Path(resolve("smollm2-135m", ModelConfig().cache_dir)) / "config.json").read_text())
    (row,) = [r for r in doc_table("KV bytes per token") if r[0] == "SmolLM2-135M"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert [int(x) for x in row[1:4]] == [config["num_hidden_layers"], config["num_key_value_heads"], head_dim]


def test_metrics_table_matches_what_the_collector_exports():
    """Names, types and label names in the docs table are exactly those services.serving.prometheus yields
    over a light engine (real Metrics and TieredStore; a memory tier with used_memory stands in for
    Redis)."""
    from types import SimpleNamespace

    from services.serving import prometheus
    from services.serving.gc_pauses import Pauses
    from services.serving.metrics import Metrics
    from store.memory_tier import MemoryTier
    from store.tiered import TieredStore
    from store.warmup import WarmupStats

    class RedisLike(MemoryTier):
        def used_memory(self) -> int:
            return 1

    tiers = [MemoryTier("cpu"), RedisLike("redis")]
    engine = SimpleNamespace(metrics=Metrics(), store=SimpleNamespace(tiered=TieredStore(tiers, [1 << 20, None])),
                             worker=SimpleNamespace(depth=lambda: (0, 0), kv_bytes=lambda: (0, 0)),
                             tier_availability=lambda: {t.name: True for t in tiers}, warmup_stats=WarmupStats,
                             pool_stats=lambda: {"kv_pool_bytes": 0, "kv_pool_free_bytes": 0, "kv_pool_misses": 0},
                             gc=Pauses())
    engine.metrics.rpc("Generate", "OK")
    exported = {}
    try:
        for family in prometheus.EngineCollector(engine).collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            exported[name] = (family.type, {k for sample in family.samples for k in sample.labels} - {"le"})
    finally:
        engine.gc.close()
    documented = {row[0].strip("`"): (row[1], {x.strip().strip("`") for x in row[2].split(",") if x.strip()})
                  for row in doc_table("## Metrics")}
    assert documented == exported
