"""SPI labels: validation of a service's label settings and decoding of IKE and ESP SPIs."""

from __future__ import annotations

import pytest

from director.packet import FLAG_INITIATOR, FLAG_RESPONSE
from director.service import ConfigError
from director.spi_label import ServerLabel, SpiLabels, mask_is_contiguous

MASK = 0x00000000FF000000  # the lab's strongswan.conf value: byte 4 of the 8-byte SPI
V2, V1 = 2, 1


def labels() -> SpiLabels:
    return SpiLabels.build(MASK, {
        0: ServerLabel(0x41000000, 0x41000000, 0x41FFFFFF),
        1: ServerLabel(0x42000000, 0x42000000, 0x42FFFFFF),
        2: ServerLabel(0x43000000, 0x43000000, 0x43FFFFFF),
    })  # fmt: skip


def spi(label: int, noise: int = 0x1234_5678_0055_AAAA) -> int:
    return (noise & ~MASK) | label


@pytest.mark.parametrize("mask, ok", [
    (0x1, True), (0xFF000000, True), (0xFFFFFFFFFFFFFFFF, True), (0x8000000000000000, True),
    (0, False), (0xFF00FF, False), (0x5, False),
])  # fmt: skip
def test_mask_contiguity(mask, ok):
    assert mask_is_contiguous(mask) is ok


def test_ikev2_client_started_sa_reads_the_responder_spi():
    sl = labels()
    # from the client, the SA's initiator: I flag set; the server's SPI is the responder SPI.
    assert sl.decode_ike(spi(0x43000000), spi(0x42000000), V2, FLAG_INITIATOR) == 1
    assert sl.decode_ike(spi(0x41000000), spi(0x43000000), V2, FLAG_INITIATOR | FLAG_RESPONSE) == 2


def test_ikev2_server_started_sa_reads_the_initiator_spi():
    # After a server-started IKE rekey the server is the new SA's initiator: messages from the
    # client carry no I flag, and the label is in the initiator SPI field even though the
    # client's random responder SPI happens to look like another server's label.
    sl = labels()
    assert sl.decode_ike(spi(0x42000000), spi(0x41000000), V2, 0) == 1
    assert sl.decode_ike(spi(0x42000000), spi(0x41000000), V2, FLAG_RESPONSE) == 1


def test_ike_sa_init_has_no_label():
    sl = labels()
    assert sl.decode_ike(spi(0x42000000), 0, V2, FLAG_INITIATOR) is None


def test_ikev1_reads_either_field_and_refuses_to_guess_on_disagreement():
    sl = labels()
    assert sl.decode_ike(spi(0x77000000), spi(0x42000000), V1, 0) == 1  # server responded
    assert sl.decode_ike(spi(0x43000000), spi(0x77000000), V1, 0) == 2  # server started (reauth)
    assert sl.decode_ike(spi(0x43000000), spi(0x43000000), V1, 0) == 2
    assert sl.decode_ike(spi(0x41000000), spi(0x42000000), V1, 0) is None
    assert sl.decode_ike(spi(0x77000000), 0, V1, 0) is None


def test_unknown_label_is_none():
    assert labels().server_of_spi(spi(0x99000000)) is None


def test_esp_ranges():
    sl = labels()
    assert sl.decode_esp(0x41000000) == 0
    assert sl.decode_esp(0x42ABCDEF) == 1
    assert sl.decode_esp(0x43FFFFFF) == 2
    assert sl.decode_esp(0x40FFFFFF) is None
    assert sl.decode_esp(0x44000000) is None
    assert sl.decode_esp(0) is None


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        SpiLabels.build(0xFF00FF, {
            0: ServerLabel(0x1_0000_0000),
            1: ServerLabel(0x10, 0x100, 0x2000),
            2: ServerLabel(0x10, 0x1000, 0x3000),  # duplicate label, overlapping range
            3: ServerLabel(0x20, 5, 0x10),  # range below 256
            4: ServerLabel(0x30, 0x5000, None),
        })  # fmt: skip
    msg = str(e.value)
    assert "spi_label.mask: must be one run of contiguous bits" in msg
    assert "servers[0].label" in msg
    assert "servers[2].label: 0x10 is already real server 1's" in msg
    assert "servers[2]: ESP range overlaps real server 1's" in msg
    assert "servers[3]: ESP range 0x5-0x10" in msg
    assert "servers[4]: esp_min and esp_max go together" in msg


@pytest.mark.parametrize("mask", [0, -1, 1 << 64])
def test_mask_out_of_range_is_refused(mask):
    with pytest.raises(ConfigError, match=r"spi_label\.mask"):
        SpiLabels.build(mask, {})


def test_label_outside_the_mask_is_refused():
    with pytest.raises(ConfigError, match=r"servers\[7\]\.label"):
        SpiLabels.build(MASK, {7: ServerLabel(0x42000001)})
