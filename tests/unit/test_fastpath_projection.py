"""The fast path's ``clients`` map as the projection of the table, through FastPath with its map
replaced by a dictionary: what ``flush`` writes and deletes, what ``adopt`` rebuilds, what the
table learns from the map's last-seen times. The kernel side (the same writes to the pinned map,
the programs reading them) is tests/integration/test_fastpath.py."""

from director.core import Director
from director.dataplane import bpf_structs as bs
from director.dataplane.ebpf import ADOPTED_SPI, FastPath, MapAccess
from director.isakmp_state import State, Timeouts
from director.lab import craft
from director.packet import ip_to_int
from director.schedulers import RealServer
from director.service import Service

VIP = ip_to_int("192.0.2.10")
OTHER_VIP = ip_to_int("192.0.2.99")
RIPS = [ip_to_int(f"198.51.100.{i}") for i in (1, 2)]
CLIENTS = [ip_to_int(f"203.0.113.{i}") for i in range(1, 10)]


class DictMap(MapAccess):
    """The ``clients`` map as a dictionary of raw key and value bytes; counts every write."""

    def __init__(self):
        self.d: dict[bytes, bytes] = {}
        self.writes = 0

    def lookup(self, key):
        return self.d.get(key)

    def update(self, key, value):
        assert len(key) == bs.CLIENT_KEY.size and len(value) == bs.CLIENT_VAL.size
        self.d[key] = value
        self.writes += 1

    def delete(self, key):
        return self.d.pop(key, None) is not None

    def items(self):
        return list(self.d.items())

    def routes(self):
        """{(vip, client, port): real server id}."""
        return {bs.unpack_client_key(k): bs.unpack_client_val(v)[0] for k, v in self.d.items()}


def setup(servers=(0, 1)):
    d = Director(capacity=256)
    d.add_service(Service(id=1, vip=VIP, scheduler_name="rr", timeouts=Timeouts(init=10.0, established=100.0),
                          servers={i: RealServer(id=i, addr=RIPS[i]) for i in servers}))
    m = DictMap()
    fp = FastPath(d, client_ifindex=1, lan_ifindex=2, lan_addr=RIPS[0] - 1, lan_mtu=1500, clients_map=m)
    fp.follow_table()
    return d, fp, m


def establish(d, client, spi, sport=4500, now=0.0):
    d.decide(craft.ike(client, VIP, spi, sport=sport, natt=sport == 4500), now)
    v = d.decide(craft.ike(client, VIP, spi, spi + 1, sport=sport, natt=sport == 4500), now)
    return v.rs


def test_flush_writes_the_raw_and_the_port_key_of_an_established_client_and_nothing_for_init():
    d, fp, m = setup()
    d.decide(craft.ike(CLIENTS[0], VIP, 1, sport=4500, natt=True), 0.0)
    assert not fp.pending
    fp.flush()
    assert m.routes() == {}  # INIT: the fast path does not know it
    rs = establish(d, CLIENTS[0], 1)
    other = establish(d, CLIENTS[1], 3, sport=500)
    assert fp.pending
    fp.flush()
    assert not fp.pending
    assert m.routes() == {(VIP, CLIENTS[0], 0): rs, (VIP, CLIENTS[0], 4500): rs, (VIP, CLIENTS[1], 0): other,
                          (VIP, CLIENTS[1], 500): other}
    assert fp.clients()[:2] == [("192.0.2.10", "203.0.113.1", 0, rs), ("192.0.2.10", "203.0.113.1", 4500, rs)]
    writes = m.writes
    establish(d, CLIENTS[0], 1, now=1.0)  # a refresh changes nothing: nothing is rewritten
    fp.flush()
    assert m.writes == writes and fp.stats["map_writes"] == 4


def test_a_port_float_moves_the_port_key_and_expiry_deletes_every_key():
    d, fp, m = setup()
    rs = establish(d, CLIENTS[0], 1, sport=500)
    fp.flush()
    d.decide(craft.ike(CLIENTS[0], VIP, 1, 2, sport=4500, natt=True), 1.0)  # NAT-T float 500 -> 4500
    fp.flush()
    assert m.routes() == {(VIP, CLIENTS[0], 0): rs, (VIP, CLIENTS[0], 4500): rs}
    assert fp.stats["map_deletes"] == 1
    d.expire(500.0)
    fp.flush()
    assert m.routes() == {} and fp.stats["map_deletes"] == 3


def test_a_removed_real_server_takes_its_clients_out_of_the_map():
    d, fp, m = setup()
    rs = establish(d, CLIENTS[0], 1)
    fp.flush()
    assert d.expire_server_entries(rs) == 1
    fp.flush()
    assert m.routes() == {}


def test_the_maps_last_seen_keeps_an_established_entry_the_table_never_sees():
    d, fp, m = setup()
    rs = establish(d, CLIENTS[0], 1)
    establish(d, CLIENTS[1], 3)
    fp.flush()
    # the kernel forwarded CLIENTS[0]'s ESP-in-UDP at t = 90 s (last_seen in ns, as bpf_ktime_get_ns)
    m.d[bs.client_key(VIP, CLIENTS[0], 4500)] = bs.client_val(rs, 90 * 10**9)
    assert d.expire(102.0) == 1  # CLIENTS[1] goes, CLIENTS[0] lives on
    assert d.table.stats["refreshed_elsewhere"] == 1
    assert d.expire(189.0) == 0
    assert d.expire(191.0) == 1  # 90 + 100: nothing newer, it expires


def test_adopt_rebuilds_established_entries_from_a_previous_daemons_map():
    d, fp, m = setup()
    m.update(bs.client_key(VIP, CLIENTS[0], 4500), bs.client_val(1, 5))
    m.update(bs.client_key(VIP, CLIENTS[0], 0), bs.client_val(1, 5))  # the raw key: no entry of its own
    m.update(bs.client_key(VIP, CLIENTS[1], 4500), bs.client_val(7, 5))  # no such real server
    m.update(bs.client_key(OTHER_VIP, CLIENTS[2], 4500), bs.client_val(0, 5))  # no such service
    assert fp.adopt(now=10.0) == 1
    (e,) = d.table.entries()
    assert (e.client, e.cport, e.rs, e.state, e.spi_i) == (CLIENTS[0], 4500, 1, State.ESTABLISHED, ADOPTED_SPI | 4500)
    assert not fp.pending  # what was adopted is what the map says already
    assert fp.adopt(now=11.0) == 0  # twice: nothing new
    assert d.stats["adopted"] == 1 and d.server(1).active == 1


def test_close_stops_following_the_table():
    d, fp, m = setup()
    fp.close()
    establish(d, CLIENTS[0], 1)
    assert not fp.pending
    fp.flush()
    assert m.routes() == {}
