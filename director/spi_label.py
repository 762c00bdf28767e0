"""SPI labels: which real server chose an IKE or ESP SPI, read from the SPI's own bits. Pure.

strongSwan stamps a per-server label into every IKE SPI it chooses (``charon.spi_mask`` /
``charon.spi_label``, applied to the SPI as it goes on the wire, most significant byte first)
and draws its inbound ESP SPIs from a per-server range (``charon.spi_min`` / ``charon.spi_max``).
So a director that has never seen a conversation can still name its real server:

- **IKE**: the label is in the SPI the *server* chose. That is the responder SPI when the client
  started the IKE SA, but the **initiator** SPI when the server started it (a server-started IKEv2
  rekey or IKEv1 reauthentication). IKEv2 says which in every header (the Initiator flag, RFC 7296
  section 3.1: set by the SA's original initiator); IKEv1 does not, so both fields are read and a
  disagreement answers None. An IKE_SA_INIT with responder SPI 0 carries no label: None.
- **ESP**: the SPI of a packet toward a server is the server's inbound SPI: it lies in the
  server's ``[spi_min, spi_max]``.

Rules (checked once, in :meth:`SpiLabels.build`; every error named at once): the mask is a
non-zero run of contiguous bits within 64 (one field, so values read as numbers and operators
can split the field among services); every label lies inside the mask and is unique within the
service; ESP ranges lie in 256..2**32-1 (RFC 4303 reserves 1-255) and do not overlap. A server
with no label is allowed only if no server of the service has one (all or none), because a
random SPI of an unlabelled server could carry another server's label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from director.packet import FLAG_INITIATOR
from director.service import ConfigError

__all__ = ["ServerLabel", "SpiLabels", "mask_is_contiguous"]

_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
ESP_SPI_MIN = 256  # RFC 4303 section 2.1: 1..255 are reserved by IANA


def mask_is_contiguous(mask: int) -> bool:
    """True for a non-zero run of adjacent one bits (0x00ff0000, not 0x00ff00ff)."""
    if mask <= 0:
        return False
    low = mask & -mask  # lowest set bit
    return (mask + low) & mask == 0


@dataclass(frozen=True, slots=True)
class ServerLabel:
    """One real server's label (positioned as in strongswan.conf's ``spi_label``) and its ESP
    inbound range (``spi_min``/``spi_max``; None when the server's IPsec stack ignores them)."""

    label: int
    esp_min: int | None = None
    esp_max: int | None = None


@dataclass(frozen=True, slots=True)
class SpiLabels:
    """A service's label mask and the decode tables; build with :meth:`build`."""

    mask: int
    by_label: Mapping[int, int]  # positioned label -> real server id
    esp_ranges: tuple[tuple[int, int, int], ...]  # (min, max, server id), sorted by min

    @classmethod
    def build(cls, mask: int, servers: Mapping[int, ServerLabel], where: str = "spi_label",
              server_path: Callable[[int], str] | None = None,
              fields: tuple[str, str, str] = ("label", "esp_min", "esp_max")) -> SpiLabels:  # fmt: skip
        """Validate and build; ``servers`` maps real server id to its label. Raises ConfigError
        naming every bad field (``where`` prefixes the paths; ``server_path(rs)`` and ``fields``
        name a server's fields as the caller's config spells them)."""
        errors: list[str] = []
        f_label, f_min, f_max = fields
        if not isinstance(mask, int) or not 0 < mask <= _U64:
            errors.append(f"{where}.mask: must be a non-zero 64-bit value, not {mask!r}")
        elif not mask_is_contiguous(mask):
            errors.append(f"{where}.mask: must be one run of contiguous bits, not {mask:#018x}")
        by_label: dict[int, int] = {}
        ranges: list[tuple[int, int, int]] = []
        for rs, sl in sorted(servers.items()):
            path = server_path(rs) if server_path is not None else f"{where}.servers[{rs}]"
            if not isinstance(sl.label, int) or sl.label < 0 or (isinstance(mask, int) and sl.label & ~mask):
                errors.append(f"{path}.{f_label}: {sl.label:#x} has bits outside the mask" if isinstance(sl.label, int) else f"{path}.{f_label}: {sl.label!r} is not a label")
            elif sl.label in by_label:
                errors.append(f"{path}.{f_label}: {sl.label:#x} is already real server {by_label[sl.label]}'s")
            else:
                by_label[sl.label] = rs
            if (sl.esp_min is None) != (sl.esp_max is None):
                errors.append(f"{path}: {f_min} and {f_max} go together")
            elif sl.esp_min is not None:
                if not (ESP_SPI_MIN <= sl.esp_min <= sl.esp_max <= _U32):
                    errors.append(f"{path}: ESP range {sl.esp_min:#x}-{sl.esp_max:#x} must satisfy "
                                  f"{ESP_SPI_MIN:#x} <= {f_min} <= {f_max} <= 0xffffffff")  # fmt: skip
                else:
                    ranges.append((sl.esp_min, sl.esp_max, rs))
        ranges.sort()
        for (lo1, hi1, a), (lo2, _hi2, b) in zip(ranges, ranges[1:]):
            if lo2 <= hi1:
                path = server_path(b) if server_path is not None else f"{where}.servers[{b}]"
                errors.append(f"{path}: ESP range overlaps real server {a}'s ({lo1:#x}-{hi1:#x})")
        if errors:
            raise ConfigError("; ".join(errors))
        return cls(mask, by_label, tuple(ranges))

    # -- decoding ---------------------------------------------------------------------------------

    def server_of_spi(self, spi: int) -> int | None:
        """The real server whose label one 64-bit IKE SPI carries (None: 0 or no such label)."""
        if not spi:
            return None
        return self.by_label.get(spi & self.mask)

    def decode_ike(self, spi_i: int, spi_r: int, ike_version: int, flags: int) -> int | None:
        """The real server that chose this IKE SA's labelled SPI, or None.

        ``ike_version`` is the major version (2 or 1, as ``Classified.ike_version``), ``flags``
        the header's flags byte.
        """
        if ike_version == 2:
            # The sender is the SA's original initiator: the server responded, its SPI is spi_r.
            # Otherwise the server started this SA: its SPI is spi_i.
            return self.server_of_spi(spi_r if flags & FLAG_INITIATOR else spi_i)
        by_r = self.server_of_spi(spi_r)
        by_i = self.server_of_spi(spi_i)
        if by_r is None:
            return by_i
        if by_i is None or by_i == by_r:
            return by_r
        return None  # both carry (different) labels: one is a chance match; say nothing

    def decode_esp(self, spi: int) -> int | None:
        """The real server whose ESP inbound range holds ``spi``, or None."""
        lo_i, hi_i = 0, len(self.esp_ranges)
        while lo_i < hi_i:  # binary search on the sorted, disjoint ranges
            mid = (lo_i + hi_i) // 2
            lo, hi, rs = self.esp_ranges[mid]
            if spi < lo:
                hi_i = mid
            elif spi > hi:
                lo_i = mid + 1
            else:
                return rs
        return None
