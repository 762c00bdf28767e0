"""Health: the rise/fall machine and the IKE probe's wire format."""

import pytest

from director.health import ENCR_PROBE, PROBE_ENTROPY, HealthConfig, HealthState, answers_probe, probe_message
from director.packet import ike_header


def test_fall_then_rise():
    h = HealthState(HealthConfig(rise=2, fall=3))
    assert [h.observe(False) for _ in range(3)] == [False, False, True] and not h.up
    assert h.observe(True) is False and not h.up  # one success is not enough
    assert h.observe(False) is False and h.fail_run == 1  # a failure restarts the rise
    assert [h.observe(True), h.observe(True)] == [False, True] and h.up
    assert (h.checks, h.failures) == (7, 4)


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="health.timeout"):
        HealthConfig(interval=1.0, timeout=2.0)
    with pytest.raises(ValueError, match="health.fall"):
        HealthConfig(fall=0)


def test_probe_is_a_well_formed_ikev2_sa_init():
    from scapy.contrib.ikev2 import IKEv2, IKEv2_KE, IKEv2_Nonce, IKEv2_SA

    entropy = bytes(range(PROBE_ENTROPY))
    spi, msg = probe_message(entropy, 0x1234)
    assert probe_message(entropy)[0] == int.from_bytes(entropy[:8], "big") | 1
    with pytest.raises(ValueError, match="entropy"):
        probe_message(b"short")
    p = IKEv2(msg)
    assert p.init_SPI == (0x1234).to_bytes(8, "big") and p.exch_type == 34 and p.flags == 0x08
    assert p.length == len(msg)
    assert p.haslayer(IKEv2_SA) and p.haslayer(IKEv2_Nonce)
    assert p[IKEv2_KE].group == 31 and p[IKEv2_KE].ke == entropy[8:40]
    assert p[IKEv2_Nonce].nonce == entropy[40:72]
    transforms = p[IKEv2_SA].prop.trans
    assert [t.transform_type for t in transforms.iterpayloads()] == [1, 2, 3, 4]
    # a private-use encryption transform: the server must answer NO_PROPOSAL_CHOSEN and keep nothing
    assert next(transforms.iterpayloads()).transform_id == ENCR_PROBE == 1025


def test_answers_match_only_our_spi_and_well_formed_messages():
    reply = ike_header(0x1234, 0x9999, 34, flags=0x20)
    assert answers_probe(reply, 0x1234)
    big = ike_header(0xA1B2C3D4E5F60718, 1, 34, flags=0x20)
    assert answers_probe(big, 0xA1B2C3D4E5F60718)
    assert not answers_probe(reply, 0x4321)
    assert not answers_probe(reply[:27], 0x1234)
    assert not answers_probe(reply[:17] + b"\x70" + reply[18:], 0x1234)  # version 7


def test_echo_request_checksums_to_zero_and_its_reply_parses():
    from director.health import _icmp_checksum, echo_request, parse_echo_reply

    req = echo_request(0x1234, 7)
    assert req[0] == 8 and _icmp_checksum(req) == 0
    ip = bytes([0x45, 0, 0, 20 + len(req)]) + bytes(16)  # enough of an IPv4 header for the parser
    reply = bytes([0, 0]) + req[2:]  # type 0: what the server sends back (checksum not checked)
    assert parse_echo_reply(ip + reply) == (0x1234, 7)
    assert parse_echo_reply(ip + req) is None  # a request is not a reply
    assert parse_echo_reply(ip + reply[:7]) is None  # truncated
    assert parse_echo_reply(b"\x60" + bytes(40)) is None  # not IPv4
