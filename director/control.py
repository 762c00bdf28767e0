"""Control-socket requests that change services: each one yields a new desired Config. Pure.

Protocol (versioned, one JSON object per line each way): a request ``{"v": 1, "cmd": NAME, ...}``
gets ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "field: message"}``. A changing
request edits the desired config, which is then validated whole (director.config) and applied by
the reconciler; on any error nothing changes. Commands and their arguments:

    add-service  {service: {vip, scheduler, method, affinity, ah, timeouts, ..., server: [...]}}
    edit-service {vip, changes: {scheduler, scheduler_options, method, affinity, ah, timeouts, ...}}
    del-service  {vip}
    clear        {}
    add-server   {vip, server: {address, weight, method, u_threshold, l_threshold}}
    edit-server  {vip, address, changes: {weight, method, u_threshold, l_threshold}}
    del-server   {vip, address}
    set-timeouts {init?, established?}              every service
    restore      {services: [service, ...]}         replaces all services at once
Read-only commands (answered by the daemon): status, services, connections {client?, server?},
save, zero {vip?}, reload.
Route health injection (answered by the daemon): drain {vip?}, undrain {vip?}: with a VIP, the
service's ``drain`` setting (an edit of the desired config, so ``save`` keeps it); without, the
whole director until the next drain/undrain or restart (the start value is ``[daemon.bgp] drain``).
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from director.config import Config, ConfigErrors, from_dict, to_dict

PROTOCOL_VERSION = 1
MUTATIONS = frozenset({
    "add-service", "edit-service", "del-service", "clear", "add-server", "edit-server", "del-server",
    "set-timeouts", "restore",
})
_EDITABLE_SERVICE = {"scheduler", "scheduler_options", "method", "affinity", "affinity_prefix", "ah", "timeouts",
                     "retransmit_threshold", "soft_expiry", "health", "drain",
                     "expire_quiescent", "spi_label", "return_path", "ingress"}
_EDITABLE_SERVER = {"weight", "method", "u_threshold", "l_threshold", "spi_label", "esp_spi_min", "esp_spi_max"}


class RequestError(ValueError):
    """A bad request: one line naming the field."""


def _arg(req: dict, name: str, kind: type) -> Any:
    if name not in req:
        raise RequestError(f"{name}: missing")
    v = req[name]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise RequestError(f"{name}: must be {kind.__name__}, got {v!r}")
    return v


def addr_arg(req: dict, name: str) -> str:
    """An IPv4 or IPv6 address, in the text the config holds it in (RFC 5952 for IPv6), so an
    operator's "2001:DB8:0::1" finds the service written "2001:db8::1"."""
    v = _arg(req, name, str)
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise RequestError(f"{name}: not an IPv4 or IPv6 address: {v!r}") from None


def _find_service(services: list[dict], vip: str) -> int:
    for i, s in enumerate(services):
        if s.get("vip") == vip:
            return i
    raise RequestError(f"vip: no service {vip}")


def _find_server(service: dict, address: str) -> int:
    for j, r in enumerate(service.get("server", [])):
        if r.get("address") == address:
            return j
    raise RequestError(f"address: no real server {address} in service {service['vip']}")


def mutate(desired: Config, req: dict) -> Config:
    """The desired config after ``req``; RequestError (one line, naming the field) when invalid."""
    cmd = req.get("cmd")
    d = to_dict(desired)
    services: list[dict] = d["service"]
    touched: int | None = None
    if cmd == "add-service":
        svc = copy.deepcopy(_arg(req, "service", dict))
        vip = addr_arg(svc, "vip")
        if any(s["vip"] == vip for s in services):
            raise RequestError(f"vip: service {vip} exists")
        svc["vip"] = vip
        services.append(svc)
        touched = len(services) - 1
    elif cmd == "edit-service":
        touched = _find_service(services, addr_arg(req, "vip"))
        changes = _arg(req, "changes", dict)
        for k, v in changes.items():
            if k not in _EDITABLE_SERVICE:
                raise RequestError(f"changes.{k}: not an editable service setting")
            if k in ("timeouts", "soft_expiry", "health", "scheduler_options", "ingress") and isinstance(v, dict):
                base = services[touched].get(k, {}) if k != "scheduler_options" else {}
                services[touched][k] = {**base, **v}
            else:
                services[touched][k] = v
    elif cmd == "del-service":
        del services[_find_service(services, addr_arg(req, "vip"))]
    elif cmd == "clear":
        services.clear()
    elif cmd == "add-server":
        touched = _find_service(services, addr_arg(req, "vip"))
        server = copy.deepcopy(_arg(req, "server", dict))
        address = addr_arg(server, "address")
        if any(r["address"] == address for r in services[touched].get("server", [])):
            raise RequestError(f"address: real server {address} exists in service {services[touched]['vip']}")
        server["address"] = address
        services[touched].setdefault("server", []).append(server)
    elif cmd == "edit-server":
        touched = _find_service(services, addr_arg(req, "vip"))
        j = _find_server(services[touched], addr_arg(req, "address"))
        for k, v in _arg(req, "changes", dict).items():
            if k not in _EDITABLE_SERVER:
                raise RequestError(f"changes.{k}: not an editable real server setting")
            services[touched]["server"][j][k] = v
    elif cmd == "del-server":
        touched = _find_service(services, addr_arg(req, "vip"))
        del services[touched]["server"][_find_server(services[touched], addr_arg(req, "address"))]
    elif cmd == "set-timeouts":
        values = {k: req[k] for k in ("init", "established") if k in req}
        if not values:
            raise RequestError("set-timeouts: give init and/or established")
        for s in services:
            s["timeouts"] = {**s.get("timeouts", {}), **values}
    elif cmd == "restore":
        new = _arg(req, "services", list)
        d["service"] = copy.deepcopy(new)
    else:
        raise RequestError(f"cmd: unknown command {cmd!r}")
    try:
        return from_dict(d)
    except ConfigErrors as e:
        # name the service being changed as "service", not by its position in the list
        lines = [x.replace(f"service[{touched}].", "service.", 1) if touched is not None else x for x in e.errors]
        raise RequestError("; ".join(lines)) from None
