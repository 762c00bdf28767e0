"""The reply queue's return path (dataplane.verdicts.Verdicts.on_reply with return_path = "director"):
the sender told by the queued packet's MAC, the forwarded packet dropped from the queue and sent
again from the output path (TTL - 1, fragmented to the client side's MTU), everything else dropped.
The queue packet and the raw socket are stand-ins; the core and the sender map are the real ones."""

import struct

from director.core import Director
from director.dataplane.return_path import Senders
from director.dataplane.verdicts import Verdicts
from director.drop_reasons import DropReason
from director.isakmp_state import Timeouts
from director.lab import craft
from director.packet import build_ipv4_udp, ip_to_int
from director.schedulers import RealServer
from director.service import Method, Service

VIP = ip_to_int("192.0.2.10")
RIP = ip_to_int("198.51.100.1")
CLIENT = ip_to_int("203.0.113.7")
MAC_RS, MAC_OTHER = bytes.fromhex("020000000001"), bytes.fromhex("020000000009")


class Pkt:
    def __init__(self, data: bytes, mac: bytes):
        self.data, self.mac, self.verdict = data, mac, None

    def get_payload(self):
        return self.data

    def get_hw(self):
        return self.mac + b"\0\0"  # NetfilterQueue gives 8 bytes

    def drop(self):
        self.verdict = "drop"

    def accept(self):
        self.verdict = "accept"

    def set_payload(self, data):
        self.data = data


class Raw:
    def __init__(self):
        self.sent = []

    def sendto(self, data, dest):
        self.sent.append((bytes(data), dest))


class Hist:
    def observe(self, v):
        pass


def world():
    d = Director(capacity=64)
    d.add_service(Service(id=1, vip=VIP, method=Method.DR, return_path="director", timeouts=Timeouts(10.0, 100.0),
                          servers={0: RealServer(id=0, addr=RIP, weight=1)}))  # fmt: skip
    stats = {k: 0 for k in ("packets", "internal_errors", "send_errors", "returned", "return_ttl_expired")}
    v = Verdicts(d, clock=lambda: 1.0, stats=stats, latency={"client": Hist(), "reply": Hist()}, icmp_rate=10)
    v.raw = Raw()
    v.client_mtu = 576
    v.senders = Senders(lambda: {RIP: MAC_RS}, lambda: 1.0)
    v.senders.set_servers({RIP: 0})
    d.decide(craft.ike(CLIENT, VIP, 1), 0.0)
    return d, v


def test_a_reply_of_its_server_leaves_from_the_output_path_ttl_decremented():
    d, v = world()
    p = Pkt(craft.ike(VIP, CLIENT, 1, 0x77), MAC_RS)
    v.on_reply(p)
    assert p.verdict == "drop"  # never accepted: it would die at the martian check
    [(sent, dest)] = v.raw.sent
    assert dest == ("203.0.113.7", 0)
    assert sent[8] == p.data[8] - 1 and sent[:8] == p.data[:8] and sent[9] == p.data[9] and sent[12:] == p.data[12:]
    assert d.table.server_spi_r(d.table.lookup(1, CLIENT, 1)) == 0x77
    assert v.stats["returned"] == 1


def test_a_reply_from_another_mac_is_dropped_and_counted():
    d, v = world()
    p = Pkt(craft.ike(VIP, CLIENT, 1, 0x77), MAC_OTHER)
    v.on_reply(p)
    assert p.verdict == "drop" and v.raw.sent == []
    assert d.drops[DropReason.RETURN_WRONG_SERVER] == 1
    assert d.table.server_spi_r(d.table.lookup(1, CLIENT, 1)) is None


def test_a_large_reply_is_fragmented_to_the_client_side_mtu():
    d, v = world()
    big = build_ipv4_udp(VIP, CLIENT, 500, 500, craft.ike(VIP, CLIENT, 1, 0x77, body=bytes(1500))[28:])
    # ID 0 (the kernel would fill in each fragment's differently), DF clear (as a reassembled datagram)
    big = big[:4] + b"\0\0\0\0" + big[8:]
    v.on_reply(Pkt(big, MAC_RS))
    frags = [s for s, _ in v.raw.sent]
    assert len(frags) == 3 and all(len(f) <= 576 for f in frags)
    ids = {f[4:6] for f in frags}
    assert len(ids) == 1 and ids != {b"\0\0"}
    payload = b"".join(f[20:] for f in sorted(frags, key=lambda f: struct.unpack_from(">H", f, 6)[0] & 0x1FFF))
    assert payload == big[20:]


def test_a_large_reply_with_df_set_is_not_sent():
    d, v = world()
    big = build_ipv4_udp(VIP, CLIENT, 500, 500, craft.ike(VIP, CLIENT, 1, 0x77, body=bytes(1500))[28:])
    big = big[:6] + b"\x40\x00" + big[8:]
    v.on_reply(Pkt(big, MAC_RS))
    assert v.raw.sent == [] and v.stats["send_errors"] == 1


def test_ttl_one_is_not_sent():
    d, v = world()
    p = Pkt(bytearray(craft.ike(VIP, CLIENT, 1, 0x77)), MAC_RS)
    p.data[8] = 1
    p.data = bytes(p.data)
    v.on_reply(p)
    assert p.verdict == "drop" and v.raw.sent == [] and v.stats["return_ttl_expired"] == 1
