"""Every shipped monitoring file is checked: promtool on deploy/prometheus/*, every alert fires in a
promtool test case, and every metric the dashboard or an alert queries is served by a live daemon.

Why a sample name in one scrape is a fair test of "exists": the collector (director/metrics.py)
writes every label value of every family on each scrape, zeros included (each service x kind x
verdict, each real server, each drop reason, both NFQUEUE histograms), so no family waits for its
first event to appear. Families that exist only with a setting (the table sync's with
[daemon.sync], route injection's with [daemon.bgp]) come from a second scrape, of a daemon in a
two-director ECMP lab that announces through its BIRD and shares its table with the other; ``up``
is made by Prometheus, not by the daemon. The daemon here also sees real IKE and ESP, and the test checks
the scrape counted them, so the endpoint is shown serving live numbers, not a static page.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from director.lab.ecmp import EcmpLab
from director.lab.netns import REPO, cleanup, in_netns, list_labs
from director.lab.wait import wait_for

PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "vpn-director-dashboard.json"
FROM_PROMETHEUS = {"up"}  # series Prometheus makes itself
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing (Debian: apt-get install prometheus)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\S+)\s*$", (PROM / "alerts.yml").read_text(), re.M)


def alert_exprs() -> list[str]:
    """The expr of each rule in alerts.yml: inline, or the more-indented lines of a block scalar."""
    exprs, lines = [], (PROM / "alerts.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        if m.group(2) not in (">-", ">", "|", "|-"):
            exprs.append(m.group(2))
            continue
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            block.append(nxt.strip())
        exprs.append(" ".join(block))
    return exprs


def dashboard_queries() -> list[str]:
    """Every PromQL string of the dashboard: panel targets (expr) and template variables (query)."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query") and isinstance(v, str):
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana's $variables allowed in matchers/ranges)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\blabel_values\(([^,()]*),\s*\w+\s*\)", r" \1 ", e)  # Grafana: label_values(metric, label)
    e = re.sub(r"\blabel_values\(\s*\w+\s*\)", " ", e)  # label_values(label): no metric
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\(?)", e):
        if m.group(2) or m.group(1).lower() in PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(m.group(1))
    return names


def scrape(lab, address: str, role: str = "director") -> str:
    with in_netns(lab.ns[role]):
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
            return r.read().decode()


def samples(text: str) -> dict[str, float]:
    """Sample name{labels} -> value, comments skipped."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metric_name_extraction_reads_promql():
    assert metric_names('sum by (instance, service) (director_real_server_up * director_real_server_weight) == 0 '
                        'or (sum by (instance, service) (director_packets_total) * 0 unless on (instance, service) '
                        'director_real_server_weight)') == {
        "director_real_server_up", "director_real_server_weight", "director_packets_total"}
    assert metric_names('histogram_quantile(0.99, sum by (queue, le) (rate(x_bucket{instance=~"$instance"}'
                        '[$__rate_interval]))) > 0.01') == {"x_bucket"}
    assert metric_names('label_values(director_build_info, instance)') == {"director_build_info"}


def test_promtool_passes_on_every_shipped_prometheus_file():
    for args in (("check", "config", str(PROM / "prometheus.yml")), ("check", "rules", str(PROM / "alerts.yml")),
                 ("test", "rules", str(PROM / "alerts.test.yml"))):
        r = promtool(*args)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}"
    shipped = {p.name for p in PROM.iterdir()}
    assert shipped == {"prometheus.yml", "alerts.yml", "alerts.test.yml"}, f"unchecked file in {PROM}: {shipped}"


def test_every_alert_fires_in_a_promtool_case():
    """Each alert of alerts.yml has an alert_rule_test case with at least one expected alert (promtool
    then proves it fires with those labels and annotations)."""
    text = (PROM / "alerts.test.yml").read_text()
    firing = set(re.findall(r"alertname: (\S+)\s*\n\s*exp_alerts:\s*\n\s*- exp_labels:", text))
    names = alert_names()
    assert len(names) >= 10, names
    assert set(names) <= firing, f"alerts without a firing case: {sorted(set(names) - firing)}"
    assert firing <= set(names), f"cases for alerts that do not exist: {sorted(firing - set(names))}"


def scrape_scale_out() -> str:
    """A scrape of d1 in a two-director ECMP lab: [daemon.bgp] through its BIRD (a session to the
    router), [daemon.sync] role all with d2 (a datagram from d2 has arrived)."""
    lab = EcmpLab("dr", directors=2)
    daemons = []
    try:
        lab.up()
        for role in lab.director_roles:
            other = next(r for r in lab.director_roles if r != role)
            extra = (f'[daemon.bgp]\nsocket = "{lab.bird_socket(role)}"\ninclude = "{lab.bird_include(role)}"\n'
                     f'shutdown_wait = 0.1\n[daemon.sync]\npeers = ["{lab.director_lan_addr(other)}"]\n'
                     f'bind = "{lab.director_lan_addr(role)}"\nkey = "{"ab" * 32}"\nrole = "all"\n'
                     f'state_file = "{lab._tmp() / f"sync-{role}.json"}"\n')  # fmt: skip
            d = DirectorProcess(lab, name=f"director-{role}", role=role, scheduler="mh", daemon_extra=extra,
                                metrics="127.0.0.1:9817" if role == "d1" else "")
            daemons.append(d.start())
        d1 = daemons[0]
        wait_for(lambda: d1.status().get("bgp", {}).get("sessions"), 30.0, "d1's BGP sessions read")
        wait_for(lambda: any(p.get("last_age") is not None for p in d1.status()["sync"]["peers"]), 10.0,
                 "a sync datagram from d2")
        return scrape(lab, "127.0.0.1:9817", role="d1")
    finally:
        for d in daemons:
            d.stop()
        lab.down()
        if list_labs(lab.prefix).get(lab.prefix):
            cleanup(lab.prefix)


def test_every_queried_metric_is_served_by_a_running_daemon(make_lab, ecmp_prerequisites):
    queried = {}
    for source, exprs in (("alerts.yml", alert_exprs()), (DASHBOARD.name, dashboard_queries())):
        assert exprs, f"no queries found in {source}"
        for expr in exprs:
            for name in metric_names(expr):
                queried.setdefault(name, source)
    assert len(queried) >= 20, queried

    lab = make_lab("dr")
    d = DirectorProcess(lab, dataplane="ebpf", metrics="127.0.0.1:9816").start()
    try:
        c1 = LabClient(lab, "c1")
        c1.ikev2_connect()
        wait_for(lambda: d.status()["fastpath"]["clients"] >= 2, what="c1 in the fast path's map")
        for seq in range(1, 11):
            c1.send_esp(0xE1, seq)
        wait_for(lambda: d.status()["fastpath"]["forwarded"]["ESP"] == 10, what="10 ESP in the kernel")
        text = scrape(lab, "127.0.0.1:9816")
    finally:
        assert d.stop() == 0, d.log()

    served = samples(text)
    names = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", k).group(0) for k in served | samples(scrape_scale_out())}
    missing = {n: src for n, src in queried.items() if n not in names and n not in FROM_PROMETHEUS}
    assert not missing, f"queried but not in a live scrape: {missing}"
    # Live numbers: the IKE exchange was counted, and so were c1's entries.
    ike = sum(v for k, v in served.items() if k.startswith("director_packets_total{") and 'verdict="forward"' in k
              and 'kind="ike' in k)
    assert ike >= 2, [k for k in served if k.startswith("director_packets_total")]
    assert served['director_entries{state="established"}'] >= 1
