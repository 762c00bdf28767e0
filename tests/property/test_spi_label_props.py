"""Properties of SPI label decoding: any SPI a labelled server makes decodes to that server."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from director.packet import FLAG_INITIATOR
from director.spi_label import ServerLabel, SpiLabels

U64 = st.integers(0, 2**64 - 1)


@st.composite
def labelled_services(draw):
    width = draw(st.integers(1, 16))
    shift = draw(st.integers(0, 64 - width))
    mask = ((1 << width) - 1) << shift
    n = draw(st.integers(1, min(8, 1 << width)))
    values = draw(st.lists(st.integers(0, (1 << width) - 1), min_size=n, max_size=n, unique=True))
    # ESP ranges: n disjoint slices of [256, 2**32) in order
    cuts = sorted(draw(st.lists(st.integers(256, 2**32 - 1), min_size=2 * n, max_size=2 * n, unique=True)))
    servers = {rs: ServerLabel(v << shift, cuts[2 * rs], cuts[2 * rs + 1]) for rs, v in enumerate(values)}
    return SpiLabels.build(mask, servers), servers


@given(labelled_services(), U64, U64, st.data())
def test_a_labelled_spi_names_its_server_in_either_field(svc, noise, other, data):
    sl, servers = svc
    rs = data.draw(st.sampled_from(sorted(servers)))
    mine = (noise & ~sl.mask) | servers[rs].label
    if mine == 0:  # a zero SPI is not an SPI (only possible with label 0 and zero noise)
        return
    # IKEv2: exact whichever side started the SA, whatever the other SPI holds
    assert sl.decode_ike(other or 1, mine, 2, FLAG_INITIATOR) == rs
    assert sl.decode_ike(mine, other, 2, 0) == rs
    # IKEv1: either field; never a wrong server, at worst None when the other SPI also decodes
    for got in (sl.decode_ike(other, mine, 1, 0), sl.decode_ike(mine, other, 1, 0)):
        assert got in (rs, None)
        if sl.server_of_spi(other) in (None, rs):
            assert got == rs


@given(labelled_services(), st.data())
def test_esp_spis_in_a_range_name_its_server_and_others_none(svc, data):
    sl, servers = svc
    rs = data.draw(st.sampled_from(sorted(servers)))
    s = servers[rs]
    assert sl.decode_esp(data.draw(st.integers(s.esp_min, s.esp_max))) == rs
    x = data.draw(st.integers(0, 2**32 - 1))
    want = next((r for r, v in servers.items() if v.esp_min <= x <= v.esp_max), None)
    assert sl.decode_esp(x) == want
