"""Operator surface against the real daemon in the lab: reload with traffic flowing, metrics.

Every test runs with the NFQUEUE dataplane alone and with the eBPF fast path.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess, lab_config


DATAPLANES = ["nfqueue", "ebpf"]


def _start(lab, dataplane: str, **kw) -> DirectorProcess:
    d = DirectorProcess(lab, dataplane=dataplane, **kw).start()
    assert d.status()["dataplane"] == dataplane, d.log()
    return d


def _in_fast_path(d, dataplane: str) -> None:
    """With eBPF, wait until the established client is in the fast path's map, so that its ESP is
    forwarded by the kernel, never seen by the daemon: the metrics must count it all the same."""
    if dataplane != "ebpf":
        return
    deadline = time.monotonic() + 5
    while not d.status()["fastpath"]["clients"]:
        assert time.monotonic() < deadline, d.status()
        time.sleep(0.05)


def _established(d) -> set[tuple[str, str, str]]:
    return {(c["client"], c["spi_i"], c["rs_address"]) for c in d.connections() if c["state"] == "ESTABLISHED"}


@pytest.mark.parametrize("dataplane", DATAPLANES)
@pytest.mark.parametrize("how", ["sighup", "api"])
def test_reload_with_clients_connected_loses_nothing(make_lab, how, dataplane):
    lab = make_lab("dr")
    d = _start(lab, dataplane, scheduler="rr")
    try:
        clients = [LabClient(lab, r) for r in ("c1", "c2", "c3")]
        clients[0].ikev2_connect()
        clients[1].ikev2_connect()
        clients[2].ikev1_connect()
        time.sleep(0.2)
        before = _established(d)
        assert len(before) == 3
        c1_rs = next(rs for client, _spi, rs in before if client == lab.client_addrs["c1"])

        sent = 0
        stop = threading.Event()

        def pump():  # c1 keeps sending ESP through the reload
            nonlocal sent
            while not stop.is_set() and sent < 400:
                sent += 1
                clients[0].send_esp(0x7777, sent)
                time.sleep(0.005)

        t = threading.Thread(target=pump)
        t.start()
        time.sleep(0.3)
        # the new config: another scheduler, new weights, and c1's real server quiesced (weight 0)
        weights = tuple(0 if a == c1_rs else 3 for a in lab.rs_addrs)
        d.config_path.write_text(lab_config(lab, d.control, scheduler="wlc", weights=weights, pin_dir=str(d.pin_dir)))
        if how == "sighup":
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while d.status()["stats"]["reloads"] < 1:
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.05)
        else:
            answer = d.request("reload")
            assert answer == {"ok": True, "result": "change=1"}, answer
        time.sleep(0.3)
        stop.set()
        t.join()
        time.sleep(0.3)

        status = d.status()
        svc = status["services"][0]
        assert svc["scheduler"] == "wlc"
        assert sorted(s["weight"] for s in svc["servers"]) == sorted(weights)
        assert _established(d) == before  # not one established entry lost or moved
        i = lab.rs_addrs.index(c1_rs)
        got = [r for r in lab.received(i) if r["kind"] == "esp" and r["spi"] == 0x7777]
        assert len(got) == sent  # not one ESP packet lost, all on c1's (now quiesced) server
        # a known client's new conversation follows its own server (persistence) ...
        c2 = clients[1]
        c2_rs = next(rs for client, _spi, rs in before if client == lab.client_addrs["c2"])
        spi = LabClient.new_spi()
        c2.send_ike(spi, v1=True)
        assert c2.recv_ike(spi)
        assert [c["rs_address"] for c in d.connections() if c["spi_i"] == f"{spi:016x}"] == [c2_rs]
        # ... and new clients (ten new addresses on c1's link) never go to the quiesced server. Were
        # it still scheduled with its old weight, wlc would give it a share of ten new clients: a
        # pass by chance would need all ten to miss it, (2/3)**10 = 1.7% even for a random choice,
        # and wlc, which fills the least loaded first, leaves it none of that luck.
        news = [f"198.18.0.{21 + i}" for i in range(10)]
        socks = {}
        for addr in news:
            lab.run("c1", ["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
            s = lab.socket("c1", socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((addr, 0))
            s.settimeout(2.0)
            socks[addr] = s
        for addr, s in socks.items():
            s.sendto(LabClient.ike_bytes(LabClient.new_spi()), (lab.vip, 500))
            s.recvfrom(2048)  # answered, through the VIP
        went = {c["client"]: c["rs_address"] for c in d.connections() if c["client"] in socks}
        assert sorted(went) == sorted(news), went
        assert c1_rs not in went.values(), went
        assert len(set(went.values())) == 2  # both other servers (weight 3 each) take new clients
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_bad_reload_keeps_the_running_config(make_lab, dataplane):
    lab = make_lab("dr")
    d = _start(lab, dataplane, scheduler="rr")
    try:
        LabClient(lab, "c1").ikev2_connect()
        time.sleep(0.2)
        before = (d.request("save"), _established(d))
        d.config_path.write_text(lab_config(lab, d.control, scheduler="no-such-scheduler", pin_dir=str(d.pin_dir)))
        answer = d.request("reload")
        assert answer["ok"] is False
        assert answer["error"].startswith("service[0].scheduler: must be one of")
        assert (d.request("save"), _established(d)) == before
        d.config_path.write_text(lab_config(lab, d.control, pin_dir=str(d.pin_dir)).replace("queue = 0", "queue = 5"))
        assert d.request("reload")["error"] == "daemon.queue: cannot change at run time; restart the daemon"
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_metrics_endpoint_serves_the_traffic(make_lab, dataplane):
    lab = make_lab("nat")
    d = _start(lab, dataplane, scheduler="rr", metrics="127.0.0.1:9816")
    try:
        c1 = LabClient(lab, "c1")
        c1.ikev2_connect()
        _in_fast_path(d, dataplane)
        for seq in range(5):
            c1.send_esp(0x99, seq)
        time.sleep(0.3)
        if dataplane == "ebpf":
            assert d.status()["fastpath"]["forwarded"] == {"ESP": 5}, d.status()["fastpath"]
        text = lab.run("director", ["python3", "-c",
                                    "import urllib.request;print(urllib.request.urlopen("
                                    "'http://127.0.0.1:9816/metrics', timeout=5).read().decode())"]).stdout
        assert 'director_packets_total{kind="esp",service="198.18.0.100",verdict="forward"} 5.0' in text
        assert 'director_bytes_total{kind="esp",service="198.18.0.100",verdict="forward"} 460.0' in text  # 5 x 92
        rip = lab.rs_addrs[[i for i in range(3) if lab.received(i)][0]]
        assert (f'director_real_server_packets_total{{direction="in",kind="esp",server="{rip}",'
                f'service="198.18.0.100"}} 5.0') in text
        assert 'director_real_server_packets_total{direction="out",kind="ike_initial"' in text
        assert "director_nfqueue_handling_seconds_count{queue=\"client\"}" in text
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_real_prometheus_scrapes_the_daemon(make_lab, tmp_path, dataplane):
    """Debian's prometheus, on loopback inside the director namespace, scrapes and answers queries."""
    import json
    import shutil

    prom = shutil.which("prometheus")
    assert prom, "prometheus is not installed (deploy/setup.sh installs the Debian package)"
    lab = make_lab("dr")
    d = _start(lab, dataplane, scheduler="rr", metrics="127.0.0.1:9816")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vpn-director\n"
                   "    static_configs:\n      - targets: ['127.0.0.1:9816']\n")
    p = lab.popen("director", [prom, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                               "--web.listen-address=127.0.0.1:9090", "--log.level=warn"],
                  stdout=open(tmp_path / "prom.log", "wb"), stderr=open(tmp_path / "prom.err", "wb"))
    try:
        c1 = LabClient(lab, "c1")
        c1.ikev2_connect()
        _in_fast_path(d, dataplane)
        for seq in range(7):
            c1.send_esp(0x42, seq)
        query = 'sum(director_packets_total{kind="esp",verdict="forward"})'
        script = ("import json,sys,urllib.request,urllib.parse;"
                  "q=urllib.parse.quote(sys.argv[1]);"
                  "print(urllib.request.urlopen('http://127.0.0.1:9090/api/v1/query?query='+q, timeout=3).read().decode())")
        deadline = time.monotonic() + 30
        value = None
        while time.monotonic() < deadline:
            r = lab.run("director", ["python3", "-c", script, query], check=False)
            if r.returncode == 0:
                result = json.loads(r.stdout)["data"]["result"]
                if result:
                    value = float(result[0]["value"][1])
                    if value == 7:
                        break
            assert p.poll() is None, (tmp_path / "prom.err").read_text()
            time.sleep(0.5)
        assert value == 7, f"prometheus answered {value}; its log:\n{(tmp_path / 'prom.err').read_text()}"
        r = lab.run("director", ["python3", "-c", script, 'up{job="vpn-director"}'])
        assert json.loads(r.stdout)["data"]["result"][0]["value"][1] == "1"
    finally:
        p.terminate()
        p.wait(timeout=10)
        assert d.stop() == 0, d.log()
