"""Health checks with real probes in the lab: a silent real server goes down, then comes back."""

import socket
import time

from director.lab.client import LabClient

HEALTH = "health = { interval = 0.3, timeout = 0.2, rise = 2, fall = 2 }"
IP_PORT = 'affinity = "ip-port"'  # each source port its own conversation: many "clients" from c1
# New conversations per check. Were the down server still scheduled, rr would give it every third
# one (10 of 30); were the choice random, all 30 would miss it with probability (2/3)**30 = 5.2e-6.
N_CONVERSATIONS = 30


def servers(d):
    return {s["address"]: s for s in d.status()["services"][0]["servers"]}


def wait(pred, timeout=5.0, what=""):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def new_conversations(lab, d, base_port: int, n: int = N_CONVERSATIONS) -> dict[str, int]:
    """``n`` initial IKE messages from c1, each from its own port; returns entries per real server."""
    for i in range(n):
        s = lab.socket("c1", socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", base_port + i))
        s.sendto(LabClient.ike_bytes(LabClient.new_spi()), (lab.vip, 500))
    ports = range(base_port, base_port + n)
    mine = lambda: [c for c in d.connections() if c["client"] == lab.client_addrs["c1"] and c["port"] in ports]
    wait(lambda: len(mine()) == n, what=f"{n} conversations")
    counts: dict[str, int] = {}
    for c in mine():
        counts[c["rs_address"]] = counts.get(c["rs_address"], 0) + 1
    return counts


def test_silent_server_goes_down_gets_no_new_clients_and_comes_back(make_lab, run_director):
    lab = make_lab("dr")
    d = run_director(lab, scheduler="rr", extra_service=HEALTH + "\n" + IP_PORT)
    wait(lambda: all(s["health"] and s["health"]["checks"] >= 2 for s in servers(d).values()), what="probes")
    assert all(s["up"] for s in servers(d).values())
    quiet = lab.rs_addrs[1]
    lab.start_responders(silent=(1,), only=(1,))  # rs2 keeps its address but its IKE daemon stops answering
    wait(lambda: not servers(d)[quiet]["up"], what="rs2 marked down")
    assert servers(d)[quiet]["health"]["last_error"] == "timeout"
    assert all(s["up"] for a, s in servers(d).items() if a != quiet)
    for role in ("c1", "c2", "c3"):  # new clients all land on the live servers
        c = LabClient(lab, role)
        (c.ikev1_connect if role == "c3" else c.ikev2_connect)()
    assert quiet not in {c["rs_address"] for c in d.connections()}
    counts = new_conversations(lab, d, 21000)
    assert quiet not in counts and len(counts) == 2, counts  # both live servers take them, never rs2
    lab.start_responders(only=(1,))  # it answers again (the others run on: their probes never miss)
    wait(lambda: servers(d)[quiet]["up"], what="rs2 back up")
    assert d.status()["stats"]["health_flips"] == 2, (servers(d), d.log()[-3000:])
    assert new_conversations(lab, d, 22000).get(quiet, 0) >= N_CONVERSATIONS // 3 - 1  # scheduled again


def test_icmp_second_check_marks_a_server_down_that_answers_ike_but_not_ping(make_lab, run_director):
    """health.icmp: the round needs the IKE answer and the echo reply; rs3 drops echo requests."""
    lab = make_lab("nat")
    health = HEALTH.replace("fall = 2", "fall = 2, icmp = true")
    d = run_director(lab, scheduler="rr", extra_service=health + "\n" + IP_PORT)
    wait(lambda: all(s["health"] and s["health"]["checks"] >= 2 for s in servers(d).values()), what="probes")
    assert all(s["up"] for s in servers(d).values()), servers(d)
    deaf = lab.rs_addrs[2]
    rule = ["INPUT", "-p", "icmp", "--icmp-type", "echo-request", "-j", "DROP"]
    lab.run("rs3", ["iptables", "-w", "-I", *rule])
    wait(lambda: not servers(d)[deaf]["up"], what="rs3 marked down by its silence to ping")
    assert servers(d)[deaf]["health"]["last_error"] == "icmp timeout"
    assert all(s["up"] for a, s in servers(d).items() if a != deaf)
    c = LabClient(lab, "c2")
    c.ikev2_connect()
    counts = new_conversations(lab, d, 21000)
    assert deaf not in counts and len(counts) == 2, counts
    assert deaf not in {e["rs_address"] for e in d.connections()}
    lab.run("rs3", ["iptables", "-w", "-D", *rule])
    wait(lambda: servers(d)[deaf]["up"], what="rs3 back up")
    assert servers(d)[deaf]["health"]["last_error"] == ""
    assert d.status()["stats"]["health_flips"] == 2
