"""Watching a run: a real Prometheus (the Debian package) scrapes the local Ray instance that
`python -m population.run` starts, and every panel of the shipped Grafana dashboard is evaluated
against it. Also: the organisms in Ray's state API (what the dashboard shows), the metric values
against summary.json, and the local instance listening on loopback only.

One tiny run serves every test here (module fixture); Prometheus and every process are stopped by
PID at the end."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_population import GENERATIONS, POP, TINY, Run, descendants, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "gsnn.json"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
DATASOURCES = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
COMPOSE = ROOT / "docker" / "docker-compose.yml"
LINGER = 120  # seconds the run would keep its final metrics up; the test ends it sooner with Ctrl-C
# The final values are read this long into the linger: well past the ~30 s after which Ray's exporter
# forgets a gauge nobody sets again (measured with Ray 2.60 at its default 10 s report interval).
STILL_THERE_AFTER = 45
# Grafana's built-in variables, as Grafana would expand them for a short, finely scraped run.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "1s", "${__interval}": "1s"}


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["refId"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def expand(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr!r}"
    return expr


class Prometheus:
    """The real server, on a free loopback port, with the shipped config pointed at this run."""

    def __init__(self, ray_temp_dir: str, metrics_port: int):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("the prometheus binary is missing: install the Debian package `prometheus` "
                        "(.ci/run does)")
        self.dir = Path(tempfile.mkdtemp(prefix="gsnn-prometheus-"))
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"]["scrape_interval"] = "1s"
        for job in config["scrape_configs"]:
            for sd in job.get("file_sd_configs", []):
                # Ray writes the discovery file into its temp dir (/tmp/ray by default).
                sd["files"] = [f.replace("/tmp/ray", ray_temp_dir) for f in sd["files"]]
                sd["refresh_interval"] = "1s"
            for static in job.get("static_configs", []):
                static["targets"] = [t.replace(":8090", f":{metrics_port}") for t in static["targets"]]
            for relabel in job.get("relabel_configs", []):
                relabel["regex"] = relabel["regex"].replace(":8090", f":{metrics_port}")
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "log", "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None, (self.dir / "log").read_text()
                time.sleep(0.3)
        raise AssertionError("prometheus did not become ready")

    def api(self, path: str, **params) -> list[dict]:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets(self) -> list[tuple]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as response:
            active = json.load(response)["data"]["activeTargets"]
        return [(t["labels"].get("job"), t["scrapeUrl"], t["health"], t["lastError"]) for t in active]

    def instant(self, expr: str, at: float) -> list[dict]:
        return self.api("query", query=expr, time=f"{at:.3f}")

    def over(self, expr: str, start: float, end: float) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")

    def stop(self):
        self.process.kill()
        self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def listening_sockets(pids) -> list[str]:
    """Local addresses ('hexip:hexport' as in /proc/net/tcp*) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 or ::ffff:127.x.y.z, from /proc/net/tcp* hex (32-bit words, host order)."""
    ip = address.split(":")[0]
    if len(ip) == 8:
        return ip.endswith("7F")
    return ip == "00000000000000000000000001000000" or (ip.startswith("0000000000000000FFFF0000") and ip.endswith("7F"))


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A tiny population run with pruning and PBT exploits, watched by Prometheus until every
    organism's final generation has been scraped."""
    run = Run(tmp_path_factory.mktemp("watched"))
    metrics_port, dashboard_port = free_port(), free_port()
    prometheus = Prometheus(run.ray_dir, metrics_port)
    seen, watcher = {}, None
    try:
        started = time.time()
        run.start("--pop", str(POP), "--generations", str(GENERATIONS), "--output", str(run.run_dir), *TINY,
                  "--set", f"ray.metrics_export_port={metrics_port}", "--set", f"ray.dashboard_port={dashboard_port}",
                  "--set", f"ray.metrics_linger_seconds={LINGER}",
                  # Thresholds high enough that organisms prune (the prune panels need events).
                  "--set", "pbt.mutations.prune_threshold={log_uniform: [0.01, 0.02]}",
                  "--set", "pbt.mutations.grow_threshold={log_uniform: [0.05, 0.2]}")
        output = []
        deadline = time.time() + 300
        while time.time() < deadline:
            line = run.process.stdout.readline()
            assert line, "population.run ended early:\n" + "".join(output)
            output.append(line)
            if line.startswith("resources per organism"):  # Ray and its dashboard are up
                watcher = watch_actors(dashboard_port)
            if line.startswith("generation   1/") and "sockets" not in seen:
                seen["sockets"] = listening_sockets([run.process.pid, *descendants(run.process.pid)])
            if line.startswith("metrics: keeping the final values"):
                linger_started = time.time()
                break
        else:
            raise AssertionError("the run did not finish in time:\n" + "".join(output))
        out, err = watcher.communicate(input="", timeout=150)  # the run is over: the watcher's last look
        assert watcher.returncode == 0, err
        seen["actors"] = json.loads(out)
        rows = list(csv.DictReader(open(run.run_dir / "generations.csv")))
        trials = sorted({r["trial_id"] for r in rows})
        # Wait until Prometheus has scraped every organism's final generation, and still has it
        # well after the last result (the run keeps its gauges exported through the linger).
        deadline = linger_started + LINGER - 5
        while True:
            now = time.time()
            final = prometheus.instant(f"max by (trial_id) (ray_gsnn_generation) == {GENERATIONS}", now)
            if sorted(s["metric"]["trial_id"] for s in final) == trials and now > linger_started + STILL_THERE_AFTER:
                break
            assert now < deadline, (f"final generation not scraped: {prometheus.instant('ray_gsnn_generation', now)}\n"
                                    f"targets: {prometheus.targets()}\n" + "".join(output))
            time.sleep(1)
        run.process.send_signal(signal.SIGINT)  # Ctrl-C ends the linger; the run still exits cleanly
        rest, _ = run.process.communicate(timeout=60)
        output.append(rest)
        assert run.process.returncode == 0, "".join(output)
        yield {"prometheus": prometheus, "start": started, "final": now, "trials": trials, "rows": rows,
               "summary": json.loads((run.run_dir / "summary.json").read_text()), "output": "".join(output), **seen}
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        run.kill_everything()
        prometheus.stop()


# Watches Ray's state API (what the dashboard shows) in its own process, as a user's script would,
# with the run's token (~/.ray/auth_token in the HOME shared with the run; the auth mode is read
# when ray is imported), from the start of the run until the test closes its stdin (the run is
# over; the dashboard lists ended actors too). Prints every organism actor it saw, with its PID and
# the states it saw it in.
WATCH_ACTORS = """
import json, select, sys, time
from ray.util.state import list_actors
address, deadline = sys.argv[1], time.time() + float(sys.argv[2])
seen, last = {}, False
while time.time() < deadline:
    try:
        actors = list_actors(address=address, detail=True, raise_on_missing_output=False)
    except Exception:  # the dashboard may still be starting
        actors = []
    for a in actors:
        if a.class_name == "OrganismTrainable":
            entry = seen.setdefault(a.actor_id, {"actor_id": a.actor_id, "class_name": a.class_name,
                                                 "pid": a.pid, "states": []})
            entry["pid"] = entry["pid"] or a.pid
            if a.state not in entry["states"]:
                entry["states"].append(a.state)
    if last:
        break
    last = bool(select.select([sys.stdin], [], [], 0.5)[0])  # closed: one look more, then done
print(json.dumps(list(seen.values())))
"""


def watch_actors(dashboard_port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WATCH_ACTORS, f"http://127.0.0.1:{dashboard_port}", str(2 * LINGER)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, RAY_AUTH_MODE="token"))


def test_dashboard_json_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert {"uid": "prometheus", "type": "prometheus"}.items() <= provisioned[0].items()
    assert variables["datasource"]["current"]["value"] == provisioned[0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert re.search(r"\bray_gsnn_[a-z_]+", target["expr"]), target["expr"]
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("population fitness", "fitness per organism", "hidden neurons per organism", "energy",
                   "firing rate", "grow threshold", "prune threshold", "growth and pruning", "exploits",
                   "decisions per second"):
        assert needed in titles, f"no panel for {needed}"


def test_every_metric_the_dashboard_uses_is_exported():
    from population.metrics import ORGANISM_COUNTERS, ORGANISM_GAUGES, POPULATION_GAUGES

    exported = {f"ray_{n}" for n in [*ORGANISM_GAUGES, *POPULATION_GAUGES]}
    exported |= {f"ray_{n}_total" for n in [*ORGANISM_COUNTERS, "gsnn_exploits"]}
    used = {m for _, _, expr in dashboard_targets() for m in re.findall(r"\bray_gsnn_[a-z_]+", expr)}
    assert used <= exported, used - exported


def test_every_panel_returns_data_for_the_run(watched):
    prometheus, trials = watched["prometheus"], watched["trials"]
    assert len(trials) == POP
    for title, ref, expr in dashboard_targets():
        series = prometheus.over(expand(expr), watched["start"], watched["final"])
        assert series, f"panel {title!r} query {ref} returned nothing: {expr}"
        values = [float(v) for s in series for _, v in s["values"]]
        assert all(v == v for v in values), f"NaN in {title!r}"
        if any("trial_id" in s["metric"] for s in series):
            got = sorted({s["metric"]["trial_id"] for s in series})
            assert got == trials, f"panel {title!r}: organisms {got}, run had {trials}"


def test_metric_values_agree_with_summary(watched):
    prometheus, at = watched["prometheus"], watched["final"]
    last = {r["trial_id"]: r for r in watched["rows"] if int(r["generation"]) == GENERATIONS}

    def per_organism(name):
        return {s["metric"]["trial_id"]: float(s["value"][1])
                for s in prometheus.instant(f"max by (trial_id) (ray_{name})", at)}

    # The shipped config scrapes each exporter once (under one job), so every organism is one series.
    copies = {s["metric"]["trial_id"]: float(s["value"][1])
              for s in prometheus.instant("count by (trial_id) (ray_gsnn_fitness)", at)}
    assert copies == {t: 1.0 for t in last}, copies
    fitness, hidden = per_organism("gsnn_fitness"), per_organism("gsnn_hidden_neurons")
    assert fitness == pytest.approx({t: float(r["fitness"]) for t, r in last.items()})
    assert hidden == {t: float(r["hidden_neurons"]) for t, r in last.items()}
    final = watched["summary"]["generations"][-1]
    assert final["generation"] == GENERATIONS

    def population(name):
        (sample,) = prometheus.instant(f"max(ray_{name})", at)
        return float(sample["value"][1])

    assert population("gsnn_population_best_fitness") == pytest.approx(final["best_fitness"])
    assert population("gsnn_population_mean_fitness") == pytest.approx(final["mean_fitness"])
    assert population("gsnn_population_hidden_neurons") == pytest.approx(final["total_hidden_neurons"])
    # Counters add up this run's events: pruning and exploits did happen, and agree with the CSV.
    assert sum(per_organism("gsnn_neurons_removed_total").values()) > 0
    # Every exploit is counted; a CSV row can be replaced when an exploit replays a generation.
    exploits = sum(per_organism("gsnn_exploits_total").values())
    assert exploits >= sum(1 for r in watched["rows"] if r["exploited_from"]) > 0


def test_organisms_appear_in_rays_state_api(watched):
    """Every process that computed a generation (generations.csv's actor_pid) is an organism's
    actor in Ray's state API, each actor a process of its own, at least one per organism."""
    organisms = [a for a in watched["actors"] if a["class_name"] == "OrganismTrainable"]
    pids = [a["pid"] for a in organisms]
    assert len(organisms) >= POP, watched["actors"]
    assert all(pids) and len(set(pids)) == len(pids), organisms
    computed_by = {int(r["actor_pid"]) for r in watched["rows"]}
    assert computed_by <= set(pids), (computed_by, organisms)
    assert any("ALIVE" in a["states"] for a in organisms), organisms


def test_local_instance_listens_on_loopback_only(watched):
    sockets = watched["sockets"]
    assert len(sockets) >= 3, "expected Ray's servers among the run's sockets"
    assert all(is_loopback(s) for s in sockets), sockets


def test_compose_publishes_on_loopback_only():
    compose = yaml.safe_load(COMPOSE.read_text())
    published = [p for service in compose["services"].values() for p in service.get("ports", [])]
    assert published
    for port in published:
        assert port.startswith("127.0.0.1:"), port
        assert port.split(":")[-1] not in ("6379", "10001", "8090"), f"Ray's GCS/client/metrics port published: {port}"
    env = compose["services"]["ray-head"]["environment"]
    assert {"RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST", "RAY_PROMETHEUS_HOST"} <= set(env)
    assert env["RAY_AUTH_MODE"] == "token", "the compose Ray head must keep token auth"
