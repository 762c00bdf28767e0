"""SPI labels in the eBPF fast path, in the lab with the real daemon (``--dataplane ebpf``).

The director has never seen the clients (no IKE exchange through it: as after a director loss,
when ECMP brings another director's clients here). Their ESP carries SPIs from the real servers'
labelled ranges: the kernel forwards every packet to the server its SPI names, the queue never
sees one, and the daemon, draining the kernel's records each tick, makes the ESTABLISHED entries;
then the ``clients`` map has the keys and later ESP is an ordinary hit. The status and the
Prometheus scrape count all of it. Run at both hooks, one
forwarding method each (tc with DR, XDP with NAT: the methods' rewrites are covered at both
hooks by tests/bpf; here what matters is the daemon's side), to keep the suite lean.
"""

from __future__ import annotations

import pytest

from director.lab.client import LabClient
from director.lab.director_proc import DirectorProcess
from tests.integration.test_fastpath import XDP, esp_at, wait_for, xdp_lab
from tests.integration.test_monitoring import scrape

METRICS = "127.0.0.1:9816"  # inside the lab's director namespace

LABELS = (0x41, 0x42, 0x43)  # real server i: label byte LABELS[i], ESP SPIs LABELS[i] << 24 .. | 0xFFFFFF
MASK = 0x00000000FF000000


def labelled(text: str, lab) -> str:
    """The lab's daemon config with SPI labels: the service's mask, each server's label and range."""
    text = text.replace("\n[[service.server]]", f'\nspi_label = {{ mask = "{MASK:#018x}" }}\n\n[[service.server]]', 1)
    for addr, b in zip(lab.rs_addrs, LABELS):
        text = text.replace(f'address = "{addr}"\n', f'address = "{addr}"\nspi_label = "{b << 24:#018x}"\n'
                            f"esp_spi_min = {b << 24:#x}\nesp_spi_max = {(b << 24) | 0xFFFFFF:#x}\n")  # fmt: skip
    return text


@pytest.mark.parametrize("hook,mode", [("tc", "dr"), ("xdp", "nat")])
def test_labelled_esp_of_unseen_clients_is_forwarded_in_the_kernel(make_lab, hook, mode):
    lab = make_lab(mode)
    if hook == "xdp":
        xdp_lab(lab)
    d = DirectorProcess(lab, dataplane="ebpf", metrics=METRICS, daemon_extra=XDP if hook == "xdp" else "")
    d.config_path.write_text(labelled(d.config_path.read_text(), lab))
    d.start()
    try:
        # The director's neighbours on the server side, as its health checks would have them: a
        # packet the kernel cannot route yet (no neighbour) goes to the queue, rightly, but that
        # is not what this test is about.
        for rs in lab.rs_addrs:
            lab.run("director", ["ping", "-c", "1", "-W", "1", rs])
        c1, c3 = LabClient(lab, "c1"), LabClient(lab, "c3")  # c3 behind the NAT: ESP-in-UDP
        spi1, spi3 = (LABELS[1] << 24) | 0x1111, (LABELS[2] << 24) | 0x3333
        st0 = d.status()
        assert st0["fastpath"]["label_forwarded"] == 0 and d.connections() == []
        for seq in range(1, 21):
            c1.send_esp(spi1, seq)
            c3.send_esp_in_udp(spi3, seq)
        wait_for(lambda: esp_at(lab, spi1) == {1: 20} and esp_at(lab, spi3) == {2: 20},
                 what="each client's 20 ESP packets at the server its SPI names")  # fmt: skip
        # the daemon's next tick turns the kernel's records into ESTABLISHED entries
        wait_for(lambda: len(d.connections()) == 2, timeout=5.0, what="two entries")
        conns = {c["client"]: c for c in d.connections()}
        assert set(conns) == {lab.client_addrs["c1"], lab.nat_public}
        assert conns[lab.client_addrs["c1"]]["state"] == "ESTABLISHED"
        assert conns[lab.client_addrs["c1"]]["rs_address"] == lab.rs_addrs[1]
        assert conns[lab.nat_public]["state"] == "ESTABLISHED" and conns[lab.nat_public]["natt"]
        assert conns[lab.nat_public]["rs_address"] == lab.rs_addrs[2]
        wait_for(lambda: d.status()["fastpath"]["clients"] >= 3, what="the entries' keys in the map")
        st = d.status()
        assert st["stats"]["packets"] == st0["stats"]["packets"], "a labelled packet reached the queue"
        assert st["stats"]["label_steered"] == 2
        fp = st["fastpath"]
        assert fp["forwarded"] == {"ESP": 20, "ESP_IN_UDP": 20}
        assert fp["label_forwarded"] == 40 and fp["label_created"] == 2 and fp["label_refused"] == 0
        assert fp["miss"] == 0 and fp["label_unknown"] == 0
        # from now on the clients are ordinary hits: forwarded, not label-decoded
        for seq in range(21, 31):
            c1.send_esp(spi1, seq)
            c3.send_esp_in_udp(spi3, seq)
        wait_for(lambda: esp_at(lab, spi1) == {1: 30} and esp_at(lab, spi3) == {2: 30}, what="10 more each")
        st = d.status()
        assert st["fastpath"]["forwarded"] == {"ESP": 30, "ESP_IN_UDP": 30}
        assert st["fastpath"]["label_forwarded"] == 40  # (the kernel's label counters are read live)
        assert st["stats"]["packets"] == st0["stats"]["packets"]
        # an SPI in no server's range: today's path, the queue (which answers as without labels)
        LabClient(lab, "c2").send_esp(0x44000001, 1)
        wait_for(lambda: d.status()["stats"]["packets"] == st0["stats"]["packets"] + 1, what="the queue's packet")
        fp = d.status()["fastpath"]
        assert fp["miss"] == 1 and fp["label_unknown"] == 1 and fp["label_forwarded"] == 40
        text = scrape(lab, METRICS)
        assert 'director_fastpath_label_packets_total{result="forwarded"} 40.0' in text
        assert 'director_fastpath_label_packets_total{result="unknown"} 1.0' in text
        assert 'director_fastpath_label_records_total{outcome="created"} 2.0' in text
    finally:
        assert d.stop() == 0, d.log()
