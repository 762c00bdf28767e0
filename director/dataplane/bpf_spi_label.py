"""The map value of a service's SPI labels for the eBPF fast path: ``struct spi_label_cfg`` of
ebpf/include/spi_label.h, packed from a validated :class:`director.spi_label.SpiLabels`.

Slot i holds one real server: its id, its positioned IKE label and its ESP inbound range
(``esp_max`` 0 = none). Host order throughout (the C side converts the packet's SPIs). The
daemon writes one value per labelled service into the ``spi_labels`` map, keyed by service id.
tests/bpf/test_spi_label_bpf.py checks the layout against the compiled BTF and the C decoders
against the Python ones.
"""

from __future__ import annotations

from director.dataplane.bpf_structs import SPI_LABEL_CFG, SPI_LABEL_SLOTS
from director.spi_label import SpiLabels

__all__ = ["SLOTS", "SPI_LABEL_CFG", "SPI_LABEL_NONE", "spi_label_cfg"]

SLOTS = SPI_LABEL_SLOTS
SPI_LABEL_NONE = 0xFFFF


def spi_label_cfg(labels: SpiLabels | None) -> bytes:
    """The packed value (labels off when ``labels`` is None). A service with more than SLOTS
    labelled servers cannot be mirrored: ValueError names the count."""
    if labels is None:
        return bytes(SPI_LABEL_CFG.size)
    rs_label = {rs: label for label, rs in labels.by_label.items()}
    rs_esp = {rs: (lo, hi) for lo, hi, rs in labels.esp_ranges}
    servers = sorted(set(rs_label) | set(rs_esp))
    if len(servers) > SLOTS:
        raise ValueError(f"spi_label: {len(servers)} labelled real servers, the fast path holds {SLOTS}")
    label = [0] * SLOTS
    esp_min = [0] * SLOTS
    esp_max = [0] * SLOTS
    rs = [SPI_LABEL_NONE] * SLOTS
    for i, r in enumerate(servers):
        rs[i] = r
        if r in rs_label:
            label[i] = rs_label[r]
        else:
            # no IKE label for this slot: a value outside the mask never equals spi & mask
            label[i] = ~labels.mask & 0xFFFFFFFFFFFFFFFF or 1
        esp_min[i], esp_max[i] = rs_esp.get(r, (0, 0))
    return SPI_LABEL_CFG.struct.pack(labels.mask, *label, *esp_min, *esp_max, *rs, len(servers))
