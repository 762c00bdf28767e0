"""An IPv6 VIP announced by BGP: the director's BIRD holds the generated include (one static
protocol per VIP, director/dataplane/bgp.py) and exports to a peer BIRD over an IPv6 session; the
peer learns the VIP's /128 when the director announces it and loses it when it withdraws."""

from __future__ import annotations

import subprocess
import time

import pytest

from director.dataplane.bgp import Bird, render_include
from director.lab.ecmp import bird_exe

DIRECTOR_CONF = """router id 198.18.0.1;
protocol device {{ }}
include "{include}";
protocol bgp uplink {{
    local {me} as 65010;
    neighbor {peer} as 65001;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv6 {{ import none; export where source = RTS_STATIC; }};
    ipv4 {{ import none; export where source = RTS_STATIC; }};
}}
"""
PEER_CONF = """router id 198.18.0.254;
protocol device {{ }}
protocol bgp director {{
    local {me} as 65001;
    neighbor {peer} as 65010;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv6 {{ import all; export none; }};
    ipv4 {{ import all; export none; }};
}}
"""


def wait(pred, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


def test_an_ipv6_vip_is_announced_and_withdrawn_over_bgp(make_lab):
    lab = make_lab("dr", responders=False, ipv6=True)
    d = lab._tmp()
    procs = []
    birds = {}
    try:
        for role, conf, me, peer in (("director", DIRECTOR_CONF, lab.director_wan6, lab.gw_wan6),
                                     ("gw", PEER_CONF, lab.gw_wan6, lab.director_wan6)):  # fmt: skip
            path = d / f"bird-{role}.conf"
            path.write_text(conf.format(include=d / "vips.conf", me=me, peer=peer))
            sock = d / f"bird-{role}.ctl"
            birds[role] = Bird(sock, d / "vips.conf")
            if role == "director":
                (d / "vips.conf").write_text(render_include({}))  # an empty include before BIRD reads it
            procs.append(lab.popen(role, [bird_exe(), "-f", "-c", str(path), "-s", str(sock), "-P",
                                          str(d / f"bird-{role}.pid")], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL))  # fmt: skip
            wait(lambda s=sock: s.exists(), f"{role}'s BIRD socket")
        director, peer = birds["director"], birds["gw"]
        wait(lambda: director.sessions().get("uplink") == "Established", "the IPv6 BGP session")
        known = {lab.vip6, lab.vip}

        def routes() -> str:
            return "\n".join(text for _, text in peer.command("show route").lines)

        director.apply(director.plan({lab.vip6}, known))
        got = wait(lambda: lab.vip6 + "/128" in routes() and routes(), "the peer to learn the IPv6 VIP")
        assert lab.vip + "/32" not in got  # known, not announced
        assert director.announcing() == {lab.vip6}
        director.apply(director.plan({lab.vip}, known))
        wait(lambda: lab.vip6 + "/128" not in routes() and lab.vip + "/32" in routes(), "the withdrawal")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
