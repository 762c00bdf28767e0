"""BIRD's control-socket replies parsed from its text protocol, and the generated VIP include."""

from __future__ import annotations

import pytest

from director.dataplane.bgp import Bird, BirdError, parse_protocols, parse_reply, proto_name, render_include

SHOW_PROTOCOLS = (
    "2002-Name       Proto      Table      State  Since         Info\n"
    "1002-device1    Device     ---        up     21:39:26.512  \n"
    " bfd1       BFD        ---        up     21:39:26.512  \n"
    " vip_198_18_10_100 Static     master4    up     21:39:27.001  \n"
    " uplink     BGP        ---        up     21:39:29.870  Established   \n"
    " d2         BGP        ---        start  21:39:26.512  Active        Socket: Connection refused\n"
    "0000 \n"
)


def test_a_multi_line_reply_folds_continuations_under_their_code():
    reply, rest = parse_reply(SHOW_PROTOCOLS + "0001 BIRD")
    assert reply.code == 0 and reply.ok
    assert rest == "0001 BIRD"
    assert [c for c, _ in reply.lines] == [2002, 1002, 1002, 1002, 1002, 1002, 0]
    rows = {p.name: p for p in parse_protocols(reply)}
    assert set(rows) == {"device1", "bfd1", "vip_198_18_10_100", "uplink", "d2"}
    assert rows["uplink"].proto == "BGP" and rows["uplink"].bgp_state == "Established"
    assert rows["d2"].state == "start" and rows["d2"].bgp_state == "Active"
    assert rows["vip_198_18_10_100"].state == "up"


def test_an_incomplete_reply_waits_for_more():
    reply, rest = parse_reply("1002-device1 Device --- up 21:39\n")
    assert reply is None and rest.startswith("1002-")


def test_errors_are_not_ok_and_garbage_raises():
    reply, _ = parse_reply("8003 No protocols match\n")
    assert reply.code == 8003 and not reply.ok
    reply, _ = parse_reply("9001 syntax error, unexpected CF_SYM_UNDEFINED\n")
    assert not reply.ok
    with pytest.raises(BirdError, match="unexpected line"):
        parse_reply("hello\n")


def test_spontaneous_lines_are_skipped():
    reply, _ = parse_reply("+ log line\n0009 disabled\n")
    assert reply.code == 9


def test_include_holds_one_protocol_per_vip_with_its_state():
    text = render_include({"198.18.10.101": False, "198.18.10.100": True})
    assert text.index("vip_198_18_10_100") < text.index("vip_198_18_10_101")
    first, second = text.split("protocol static ")[1:]
    assert "disabled no;" in first and "route 198.18.10.100/32 blackhole;" in first
    assert "disabled yes;" in second and "route 198.18.10.101/32 blackhole;" in second


def test_plan_is_whole_and_refuses_before_changing(tmp_path):
    bird = Bird(tmp_path / "no.sock", tmp_path / "vips.conf")
    first = bird.plan({"198.18.10.100"}, {"198.18.10.100", "198.18.10.101"})
    assert first.reconfigure and first.known == {"198.18.10.100": True, "198.18.10.101": False}
    with pytest.raises(ValueError, match="not among the known"):
        bird.plan({"198.18.10.102"}, {"198.18.10.100"})
    with pytest.raises(ValueError):
        bird.plan(set(), {"198.18.10.300"})
    assert not (tmp_path / "vips.conf").exists()


def test_apply_against_a_missing_bird_raises_and_leaves_nothing_applied(tmp_path):
    bird = Bird(tmp_path / "no.sock", tmp_path / "vips.conf", timeout=0.5)
    with pytest.raises(BirdError, match="cannot connect"):
        bird.apply(bird.plan({"198.18.10.100"}, {"198.18.10.100"}))
    assert bird.applied == {}
    assert "protocol static" not in (tmp_path / "vips.conf").read_text()  # previous (empty) include


def test_proto_name():
    assert proto_name("10.0.0.1") == "vip_10_0_0_1"
    assert proto_name("2001:DB8:0::1") == "vip6_2001_db8__1"  # RFC 5952 text, colons to underscores


def test_an_ipv6_vip_is_a_slash_128_in_an_ipv6_channel_after_the_ipv4_ones():
    text = render_include({"2001:db8::100": True, "198.18.10.100": False})
    first, second = text.split("protocol static ")[1:]
    assert first.startswith("vip_198_18_10_100") and "ipv4;" in first
    assert second.startswith("vip6_2001_db8__100") and "ipv6;" in second
    assert "route 2001:db8::100/128 blackhole;" in second and "disabled no;" in second
