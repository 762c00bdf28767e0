"""The kernel's share of the running services: iptables rules and the DR policy routes.

``apply`` makes them equal to what reconcile.kernel_state says of the Director (rules
reinstalled when the VIPs or NAT servers change; a route per new DR real server, removed with
it; the local rule moved while any DR server exists) and returns each DR real server's fwmark.
When the kernel refuses a route, this round's routes are undone and KernelRefused names the
field; the daemon then puts the previous config back.
"""

from __future__ import annotations

import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from director import reconcile
from director.config import DaemonConfig
from director.core import Director
from director.dataplane import iptables, routing


class KernelRefused(Exception):
    """The kernel refused a rule or route a config needs; the message names the field."""


class KernelRules:
    def __init__(self, cfg: DaemonConfig, ipr: IPRoute, lan_index: int) -> None:
        self.cfg = cfg
        self.ipr = ipr
        self.lan_index = lan_index
        self.state: reconcile.KernelState | None = None  # what is installed (None: nothing yet)

    def apply(self, director: Director) -> dict[int, int]:
        """Rules and routes for the running services; returns {real server id: DR fwmark}."""
        ipr, d = self.ipr, self.cfg
        want = reconcile.kernel_state(director)
        have = self.state or reconcile.KernelState((), (), ())
        if (want.vips, want.nat_servers, want.return_vips) != (have.vips, have.nat_servers, have.return_vips) \
                or self.state is None:
            iptables.install(iptables.RuleSet(d.client_interface, d.server_interface, want.vips,
                                              want.nat_servers, d.queue, d.fail_open, want.return_vips))
        gone = set(have.dr_servers) - set(want.dr_servers)
        new = set(want.dr_servers) - set(have.dr_servers)
        if want.dr_servers and not have.dr_servers:
            routing.move_local_rule(ipr)
        for rs_id, rip in sorted(new):
            try:
                routing.add_server(ipr, rs_id, rip, self.lan_index)
            except NetlinkError as e:
                for done_id, _ in sorted(new):  # undo this round's routes before giving up
                    routing.remove_server(ipr, done_id)
                if not have.dr_servers:
                    routing.restore_local_rule(ipr)
                raise KernelRefused(
                    f"server.address: {rip}: cannot route to it for direct routing "
                    f"(not on-link on {d.server_interface}?): {os.strerror(e.code)}"
                ) from None
        for rs_id, _rip in sorted(gone):
            routing.remove_server(ipr, rs_id)
        if have.dr_servers and not want.dr_servers:
            routing.restore_local_rule(ipr)
        self.state = want
        return {rs_id: routing.mark_of(rs_id) for rs_id, _ in want.dr_servers}
