"""The operations files stay true to the code: Dockerfiles, compose, Prometheus rules, Grafana.

Every metric named in a PromQL expression (alert rules, dashboard panels, dashboard variables)
must be one sttd exports, with the labels it has: the exported names come from
`Metrics.create` on a fresh registry, collected the way a scrape collects them. Every ``STT_*``
variable named in the Dockerfiles and the compose file must be a `Settings` field. Paths the
compose file mounts and the Dockerfiles copy must exist. Nothing here needs Docker or promtool.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import attrs
import pytest
import trio
import yaml
from prometheus_client import CollectorRegistry

from sttd.metrics import Metrics, QueueDepths
from sttd.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "ops/prometheus/alerts.yml"
PROMETHEUS = ROOT / "ops/prometheus/prometheus.yml"
DATASOURCES = ROOT / "ops/grafana/provisioning/datasources/prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "ops/grafana/provisioning/dashboards/sttd.yml"
DASHBOARD = ROOT / "ops/grafana/dashboards/sttd.json"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.cuda"]
# Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = frozenset({"job", "instance"})


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- exported metrics


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Every sample name sttd exposes, with its label names, as a scrape sees it."""
    registry = CollectorRegistry()
    metrics = Metrics.create(registry)
    metrics.watch_queues(lambda: QueueDepths(audio_frames=0, output_messages=0))
    for field in attrs.fields(Metrics):
        collector = getattr(metrics, field.name)
        labelnames = getattr(collector, "_labelnames", ())
        if labelnames:
            # A labelled metric exposes no samples until it has a child.
            collector.labels(*("x" for _ in labelnames))

    async def collect() -> list[Any]:
        # Inside trio, as /metrics runs: sttd_tasks_live is only exported there.
        return list(registry.collect())

    series: dict[str, set[str]] = {}
    for family in trio.run(collect):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    exported = {name: frozenset(labels) | TARGET_LABELS for name, labels in series.items()}
    exported["up"] = TARGET_LABELS
    return exported


def test_exported_series_are_collected_for_every_metric() -> None:
    exported = exported_series()
    for field in attrs.fields(Metrics):
        if field.name != "registry":  # every other field is one metric, named sttd_<field>
            assert any(name.startswith(f"sttd_{field.name}") for name in exported), field.name
    for name in ("sttd_errors_total", "sttd_final_latency_seconds_bucket",
                 "sttd_final_latency_seconds_count", "sttd_queue_depth",
                 "sttd_session_backlog_seconds_max", "sttd_tasks_live", "sttd_engine_ready"):
        assert name in exported, name
    assert "le" in exported["sttd_final_latency_seconds_bucket"]
    assert "code" in exported["sttd_errors_total"]
    assert "queue" in exported["sttd_queue_depth"]


# --------------------------------------------------------------------------- PromQL


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"\"\s*")
_NUMBER = re.compile(r"(?<![A-Za-z0-9_:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})


@attrs.frozen
class ParsedQuery:
    metrics: frozenset[str]
    selector_labels: tuple[tuple[str, frozenset[str]], ...]  # (metric, labels it matches on)
    grouping_labels: frozenset[str]


def parse_promql(expr: str) -> ParsedQuery:
    """The metric names and label names an expression uses (a narrow parser for our files)."""
    text = _STRING.sub('""', expr)
    text = _RANGE.sub(" ", text)
    grouping: set[str] = set()
    for match in _GROUPING.finditer(text):
        grouping.update(name.strip() for name in match.group(2).split(",") if name.strip())
    text = _GROUPING.sub(" ", text)
    metrics: set[str] = set()
    selectors: list[tuple[str, frozenset[str]]] = []

    def selector(match: re.Match[str]) -> str:
        name = match.group(1)
        if not name:
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        labels = set()
        for matcher in filter(str.strip, match.group(2).split(",")):
            parsed = _MATCHER.fullmatch(matcher)
            assert parsed is not None, f"cannot read matcher {matcher!r} in {expr!r}"
            labels.add(parsed.group(1))
        metrics.add(name)
        selectors.append((name, frozenset(labels)))
        return " "

    text = _SELECTOR.sub(selector, text)
    text = _NUMBER.sub(" ", text)
    for match in _IDENT.finditer(text):
        name = match.group(0)
        if name.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue  # an operator or a function
        metrics.add(name)
        selectors.append((name, frozenset()))
    return ParsedQuery(frozenset(metrics), tuple(selectors), frozenset(grouping))


def promql_problems(expr: str) -> list[str]:
    """What in `expr` names a metric or label sttd does not export."""
    exported = exported_series()
    parsed = parse_promql(expr)
    problems = [f"unknown metric {name}" for name in sorted(parsed.metrics - exported.keys())]
    for name, labels in parsed.selector_labels:
        if name in exported:
            problems += [f"{name} has no label {label}"
                         for label in sorted(labels - exported[name]) if label != "__name__"]
    if not problems:
        known = frozenset().union(*(exported[name] for name in parsed.metrics))
        problems += [f"grouping by unknown label {label}"
                     for label in sorted(parsed.grouping_labels - known)]
    return problems


def test_promql_checker_catches_renamed_metrics_and_labels() -> None:
    good = ('histogram_quantile(0.95, sum by (job, le) '
            '(rate(sttd_final_latency_seconds_bucket{instance=~"$instance"}[$__rate_interval])))')
    assert promql_problems(good) == []
    assert promql_problems(good.replace("sttd_final_latency_seconds", "sttd_final_latency")) == [
        "unknown metric sttd_final_latency_bucket"]
    assert promql_problems('sum(rate(sttd_errors_total{kode="internal"}[5m]))') == [
        "sttd_errors_total has no label kode"]
    assert promql_problems("sum by (route) (sttd_sessions_active)") == [
        "grouping by unknown label route"]
    assert promql_problems("sttd_engine_ready == 0 or up == 0") == []
    assert promql_problems("sttd_frames_dropped > 0") == ["unknown metric sttd_frames_dropped"]


# --------------------------------------------------------------------------- alert rules


def alert_rules() -> list[dict[str, Any]]:
    groups = _yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smhdwy]", str(rule.get("for", ""))), f"{name}: no `for`"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert annotations.get("description"), f"{name}: no description"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_uses_only_exported_metrics(rule: dict[str, Any]) -> None:
    assert promql_problems(rule["expr"]) == []


def test_alerts_cover_errors_latency_saturation_and_readiness() -> None:
    used = {name for rule in alert_rules() for name in parse_promql(rule["expr"]).metrics}
    assert "sttd_errors_total" in used
    assert "sttd_engine_ready" in used
    assert "sttd_scheduler_queue_wait_seconds_bucket" in used
    assert "up" in used
    assert used & {"sttd_queue_depth", "sttd_session_backlog_seconds_max",
                   "sttd_frames_dropped_total", "sttd_audio_skipped_seconds_total"}
    p95 = [rule for rule in alert_rules()
           if "sttd_final_latency_seconds_bucket" in rule["expr"]
           and "histogram_quantile(0.95" in rule["expr"].replace(" ", "")]
    assert any(re.search(r">\s*1\.5\s*$", rule["expr"].strip()) for rule in p95)


def test_alert_job_matchers_name_a_scrape_job() -> None:
    jobs = {job["job_name"] for job in _yaml(PROMETHEUS)["scrape_configs"]}
    for rule in alert_rules():
        for job in re.findall(r'job\s*=\s*"([^"]*)"', rule["expr"]):
            assert job in jobs, f"{rule['alert']}: job {job!r} is not scraped"


# --------------------------------------------------------------------------- Grafana dashboard


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    return [node["expr"] for node in _walk(dashboard())
            if isinstance(node, dict) and isinstance(node.get("expr"), str)]


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    assert board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    assert "${DS_" not in DASHBOARD.read_text()


@pytest.mark.parametrize("expr", dashboard_exprs())
def test_dashboard_uses_only_exported_metrics(expr: str) -> None:
    assert promql_problems(expr) == []


def test_dashboard_variables_use_exported_metrics() -> None:
    exported = exported_series()
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) \
            else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"unexpected variable query {query!r}"
        metric, label = match.groups()
        assert metric in exported and label in exported[metric], query


def test_dashboard_shows_the_operational_metrics() -> None:
    used = {name for expr in dashboard_exprs() for name in parse_promql(expr).metrics}
    for name in ("sttd_sessions_active", "sttd_sessions_total", "sttd_final_latency_seconds_bucket",
                 "sttd_partials_sent_total", "sttd_finals_sent_total",
                 "sttd_inference_duration_seconds_bucket", "sttd_scheduler_batch_size_bucket",
                 "sttd_scheduler_queue_wait_seconds_bucket", "sttd_session_backlog_seconds_max",
                 "sttd_frames_dropped_total", "sttd_audio_skipped_seconds_total",
                 "sttd_warnings_total", "sttd_errors_total", "sttd_http_requests_total",
                 "sttd_engine_ready", "sttd_tasks_live", "sttd_queue_depth"):
        assert name in used, name


def test_dashboard_datasources_are_provisioned() -> None:
    provisioned = {source["uid"] for source in _yaml(DATASOURCES)["datasources"]}
    refs = [node["datasource"] for node in _walk(dashboard())
            if isinstance(node, dict) and isinstance(node.get("datasource"), dict)]
    prometheus = [source for source in refs if source.get("type") == "prometheus"]
    assert prometheus
    for source in prometheus:
        assert source["uid"] in provisioned, source
    # The rest may only be Grafana's built-in annotations source.
    assert all(source == {"type": "grafana", "uid": "-- Grafana --"}
               for source in refs if source.get("type") != "prometheus")


# --------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = _yaml(COMPOSE)
    return loaded


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> repo-relative source, for the bind mounts of a compose service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = str(PurePosixPath(source))
    return mounts


def _check_probe(argv: list[str]) -> None:
    """A health probe: Python's urllib against /health (the slim image has no curl)."""
    assert PurePosixPath(argv[0]).name.startswith("python") and argv[1] == "-c", argv
    compile(argv[2], "<healthcheck>", "exec")
    assert "urllib.request.urlopen" in argv[2] and "127.0.0.1:" in argv[2], argv
    assert "/health" in argv[2], argv


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_services_and_mounts() -> None:
    spec = compose()
    services = spec["services"]
    assert {"sttd", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        for source in _bind_mounts(service).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in spec.get("volumes", {}), f"{name}: volume {source} undeclared"
        if "build" in service:
            assert (ROOT / service["build"].get("dockerfile", "Dockerfile")).is_file()
    assert services["sttd"]["build"]["dockerfile"] == "Dockerfile"
    gpu = [s for s in services.values() if "gpu" in s.get("profiles", [])]
    assert gpu and all(s["build"]["dockerfile"] == "Dockerfile.cuda" for s in gpu)


def test_compose_sttd_serves_port_8000_and_drains_in_time() -> None:
    defaults = Settings()
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue
        assert any(str(port).endswith(":8000") for port in service["ports"]), name
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        _check_probe(test[1:])
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        settings = Settings.from_env({k: v for k, v in env.items() if k.startswith("STT_")})
        assert settings.port == defaults.port == 8000
        needed = settings.drain_s + settings.shutdown_grace_s
        assert _seconds(service["stop_grace_period"]) > needed, name


def test_prometheus_config_matches_compose() -> None:
    services = compose()["services"]
    mounts = _bind_mounts(services["prometheus"])
    config_target = next(t for t, s in mounts.items() if s == "ops/prometheus/prometheus.yml")
    config = _yaml(PROMETHEUS)
    for rule_file in config["rule_files"]:
        target = str(PurePosixPath(config_target).parent / rule_file)
        assert target in mounts, f"rule file {target} is not mounted"
        assert (ROOT / mounts[target]).resolve() == ALERTS
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "sttd")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets
    for target in targets:
        host, port = target.split(":")
        assert host in services and port == "8000", target


def test_grafana_provisioning_matches_compose() -> None:
    services = compose()["services"]
    mounts = _bind_mounts(services["grafana"])
    for source in ("ops/grafana/provisioning/datasources", "ops/grafana/provisioning/dashboards"):
        assert source in mounts.values(), source
    dashboards_target = next(t for t, s in mounts.items() if s == "ops/grafana/dashboards")
    providers = _yaml(DASHBOARD_PROVIDERS)["providers"]
    assert [p["options"]["path"] for p in providers] == [dashboards_target]
    for source in _yaml(DATASOURCES)["datasources"]:
        match = re.fullmatch(r"http://([\w-]+):(\d+)/?", source["url"])
        assert match and match.group(1) in services, source["url"]
    environment = services["grafana"].get("environment", {})
    home = environment.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home == f"{dashboards_target}/{DASHBOARD.name}"


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def _env_pairs(args: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(args))


def _copy_sources(args: str) -> list[str]:
    """What a COPY takes from the build context (nothing, for COPY --from another stage)."""
    tokens = shlex.split(args)
    if any(token.startswith("--from") for token in tokens):
        return []
    return [token for token in tokens if not token.startswith("--")][:-1]


def _dockerignore_excludes(path: str) -> bool:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not handled here"
        variants = {pattern.rstrip("/"), pattern.rstrip("/").replace("**/", "")}
        if any(fnmatch.fnmatchcase(prefix, variant) for prefix in prefixes for variant in variants):
            return True
    return False


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_runs_sttd_serve(path: Path) -> None:
    instructions = dockerfile_instructions(path)
    keywords = [keyword for keyword, _ in instructions]
    assert keywords[0] in ("FROM", "ARG")
    cmd = [json.loads(args) for keyword, args in instructions if keyword in ("CMD", "ENTRYPOINT")]
    argv = [arg for part in cmd for arg in part]  # exec form only: json.loads fails otherwise
    assert PurePosixPath(argv[-2]).name == "sttd" and argv[-1] == "serve", argv
    if argv[0].startswith("/app/.venv/"):
        workdirs = [args for keyword, args in instructions if keyword == "WORKDIR"]
        assert workdirs[-1] == "/app"
    env = {k: v for keyword, args in instructions if keyword == "ENV"
           for k, v in _env_pairs(args).items()}
    assert env["STT_HOST"] == "0.0.0.0"
    assert ("EXPOSE", env["STT_PORT"]) in instructions
    Settings.from_env({k: v for k, v in env.items() if k.startswith("STT_")})
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    healthcheck = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(healthcheck) == 1
    probe = json.loads(healthcheck[0][healthcheck[0].index("CMD ") + 4:])
    _check_probe(probe)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    syncs = [args for keyword, args in instructions
             if keyword == "RUN" and "uv sync" in args]
    assert len(syncs) == 2 and all("--locked" in s and "--no-dev" in s for s in syncs)
    assert "--no-install-project" in syncs[0] and "--no-install-project" not in syncs[1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_copies_existing_unignored_paths(path: Path) -> None:
    sources = [source for keyword, args in dockerfile_instructions(path) if keyword == "COPY"
               for source in _copy_sources(args)]
    assert {"pyproject.toml", "uv.lock", "README.md", "sttd", "references"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _dockerignore_excludes(source), f".dockerignore excludes {source}"
    for ignored in (".venv", ".git", "benchmarks/peers/.venv-whisperlive"):
        assert _dockerignore_excludes(ignored), ignored


def test_cuda_dockerfile_installs_the_qwen3_extra() -> None:
    instructions = dockerfile_instructions(ROOT / "Dockerfile.cuda")
    syncs = [args for keyword, args in instructions if keyword == "RUN" and "uv sync" in args]
    assert all("--extra qwen3" in s for s in syncs)
    env = {k: v for keyword, args in instructions if keyword == "ENV"
           for k, v in _env_pairs(args).items()}
    assert env["STT_BACKEND"] == "qwen3"
    assert "HF_HOME" in env
    assert any(keyword == "VOLUME" and env["HF_HOME"].startswith(json.loads(args)[0])
               for keyword, args in instructions)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get(
        "optional-dependencies", {})
    assert any(dep.startswith("vllm") for dep in extras.get("qwen3", [])), \
        "pyproject.toml declares no `qwen3` extra with vllm, which Dockerfile.cuda installs"


@pytest.mark.parametrize("path", [*DOCKERFILES, COMPOSE], ids=lambda path: path.name)
def test_every_stt_variable_named_is_a_setting(path: Path) -> None:
    settings = {f"STT_{field.name.upper()}" for field in attrs.fields(Settings)}
    named = set(re.findall(r"\bSTT_[A-Z0-9_]+\b", path.read_text()))
    assert named, path
    assert named <= settings, sorted(named - settings)
