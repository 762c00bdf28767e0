"""vpnadm without a daemon: parsing, the combination table, requests, -S/-R text, listings, exit codes."""

import json

import pytest

from director import cli
from director.cli import COMMANDS, COMMANDS_V_OPTIONS, OPT, UsageError, execute, parse
from director.config import from_dict, to_dict

VIP, VIP2 = "192.0.2.10", "192.0.2.20"
RIP1, RIP2 = "198.51.100.1", "198.51.100.2"


class FakeDaemon:
    """Records requests; answers each command from ``answers`` (default None)."""

    def __init__(self, **answers):
        self.answers = answers
        self.requests = []

    def __call__(self, cmd, **kw):
        self.requests.append((cmd, kw))
        return self.answers.get(cmd.replace("-", "_"))


def run(argv, stdin=None, **answers):
    daemon = FakeDaemon(**answers)
    out = execute(parse(argv), daemon, stdin)
    return daemon.requests, out


# -- the table --------------------------------------------------------------------------------------
def test_table_names_only_known_commands_and_options_and_uses_every_option():
    assert {k.split()[0] for k in COMMANDS_V_OPTIONS} == {c.key for c in COMMANDS}
    used = {o for row in COMMANDS_V_OPTIONS.values() for o in row}
    assert used == set(OPT)  # no typo in the table, no option that no command accepts


LEGAL = [
    (["-A", "-V", VIP, "-s", "mh", "--scheduler-option", "table_size=251", "--method", "tun",
      "--affinity", "ip-port", "-p", "600", "--init-timeout", "10", "--no-ah"], "-A"),
    (["--add-service", "--vip", VIP, "-M", "255.255.255.255"], "-A"),
    (["-A", "-V", VIP, "-s", "mh", "-b", "mh-fallback,mh-port", "--expire-quiescent"], "-A"),
    (["-E", "-V", VIP, "--sched-flags", "mh-port", "--no-expire-quiescent"], "-E"),
    (["-A", "-V", VIP, "-s", "fo"], "-A"),
    (["-A", "-V", VIP, "-s", "ovf"], "-A"),
    (["-A", "-V", VIP, "-s", "twos"], "-A"),
    (["-E", "-V", VIP, "--ah", "--retransmit-threshold", "0", "--soft-limit", "9", "--soft-grace", "2.5"], "-E"),
    (["-D", "-V", VIP], "-D"),
    (["-C"], "-C"),
    (["-R"], "-R"),
    (["-S", "-n"], "-S"),
    (["-a", "-V", VIP, "-r", RIP1, "-m", "-w", "0", "-x", "10", "-y", "5"], "-a"),
    (["-e", "-V", VIP, "-r", RIP1, "-w", "3"], "-e"),
    (["-d", "-V", VIP, "-r", RIP1], "-d"),
    (["-L", "-n", "--stats", "--exact"], "-L"),
    (["-Ln", "-V", VIP, "--json"], "-L"),
    (["-l", "--timeout"], "-L"),
    (["-L", "-c", "--client", "203.0.113.1", "--server", RIP1, "--json"], "-L -c"),
    (["-Lnc"], "-L -c"),
    (["-Z"], "-Z"),
    (["-Z", "-V", VIP], "-Z"),
    (["--set", "20", "7200"], "--set"),
    (["--set", "0", "7200", "0"], "--set"),
    (["--drain"], "--drain"),
    (["--drain", "-V", VIP], "--drain"),
    (["--undrain", "-V", VIP], "--undrain"),
    (["-A", "-V", VIP, "--drained"], "-A"),
    ([], "-L"),  # ipvsadm lists without arguments
    (["--socket", "/tmp/x.sock"], "-L"),
]


@pytest.mark.parametrize("argv,command", LEGAL, ids=[" ".join(a) or "(none)" for a, _ in LEGAL])
def test_legal_combinations(argv, command):
    assert parse(argv).command == command


ILLEGAL = [
    (["-A", "-V", VIP, "-w", "1"], "illegal option combination: -A with -w"),
    (["-A", "-s", "rr"], "missing option: -A needs -V ADDRESS"),
    (["-A", "-V", VIP, "--affinity", "ip", "-M", "255.255.255.255"], "conflicting options: --affinity and -M with -A"),
    (["-E", "-V", VIP, "--ah", "--no-ah"], "conflicting options: --ah and --no-ah with -E"),
    (["-E", "-V", VIP, "-r", RIP1], "illegal option combination: -E with -r"),
    (["-D", "-V", VIP, "-s", "rr"], "illegal option combination: -D with -s"),
    (["-C", "-V", VIP], "illegal option combination: -C with -V"),
    (["-R", "-n"], "illegal option combination: -R with -n"),
    (["-S", "--json"], "illegal option combination: -S with --json"),
    (["-a", "-V", VIP, "-r", RIP1, "--stats"], "illegal option combination: -a with --stats"),
    (["-a", "-V", VIP], "missing option: -a needs -r RIP"),
    (["-a", "-V", VIP, "-r", RIP1, "-g", "-m"], "conflicting options: -g and -m with -a"),
    (["-e", "-V", VIP, "-r", RIP1, "-s", "rr"], "illegal option combination: -e with -s"),
    (["-d", "-V", VIP, "-r", RIP1, "-w", "1"], "illegal option combination: -d with -w"),
    (["-L", "--stats", "--rate"], "conflicting options: --stats and --rate with -L"),
    (["-L", "--client", "203.0.113.1"], "illegal option combination: -L with --client"),
    (["-L", "-c", "--stats"], "illegal option combination: -L -c with --stats"),
    (["-Z", "-V", VIP, "-r", RIP1], "illegal option combination: -Z with -r"),
    (["--set", "1", "2", "-V", VIP], "illegal option combination: --set with -V"),
    (["--drain", "-V", VIP, "-r", RIP1], "illegal option combination: --drain with -r"),
    (["--undrain", "--json"], "illegal option combination: --undrain with --json"),
    (["-E", "-V", VIP, "--drained"], "illegal option combination: -E with --drained"),
    (["-A", "-D", "-V", VIP], "multiple commands specified"),
    (["-A", "-V", VIP, "-s", "rr", "-s", "wlc"], "multiple -s options specified"),
    (["-n"], "no command given"),
    (["-A", "-V", VIP, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["-A", "-t", "192.0.2.10:500"], "use -V ADDRESS"),
    (["-a", "-V", VIP, "-r", RIP1, "-w", "heavy"], "-w: not an integer: 'heavy'"),
    (["-A", "-V", VIP, "-p", "soon"], "-p: not a number: 'soon'"),
    (["-A", "-V", VIP, "-p", "nan"], "-p: not a number: 'nan'"),
    (["-A", "-V", VIP, "--scheduler-option", "table_size"], "--scheduler-option: expected KEY=VALUE"),
    (["--set", "30"], "--set takes INIT ESTABLISHED"),
    (["--set", "30", "3600", "300"], "third value (ipvsadm's udp timeout) is not used"),
    (["-A", "-V", VIP, "-M", "255.0.255.0"], "-M 255.0.255.0: not a prefix length or a contiguous IPv4 netmask"),
    (["-A", "-V", VIP, "-M", "33"], "-M 33: a prefix length is 1..32 for this VIP"),
]


@pytest.mark.parametrize("argv,message", ILLEGAL, ids=[m for _, m in ILLEGAL])
def test_illegal_invocations(argv, message):
    with pytest.raises(UsageError) as e:
        execute(parse(argv), FakeDaemon())  # -M is refused on building the request
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_every_command_has_a_legal_and_an_illegal_case():
    legal = {c for _, c in LEGAL}
    illegal = {m.rsplit(" with ", 1)[-1] if m.startswith("conflicting") else m.split(" with ")[0].split(": ")[-1]
               for _, m in ILLEGAL if " with " in m}
    assert legal == set(COMMANDS_V_OPTIONS)
    assert illegal == set(COMMANDS_V_OPTIONS)


def test_values_are_typed():
    a = parse(["-A", "-V", VIP, "--scheduler-option", "table_size=251", "--scheduler-option", "fallback=false",
               "-p", "600", "--init-timeout", "2.5"]).args
    assert a == {"vip": VIP, "scheduler-option": {"table_size": 251, "fallback": False},
                 "persistent": 600, "init-timeout": 2.5}
    assert parse(["--set", "0", "7200"]).values == (0, 7200)


def test_socket_from_option_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("VPNADM_SOCKET", raising=False)
    assert parse(["-L"]).socket == "/run/vpn-director/control.sock"
    monkeypatch.setenv("VPNADM_SOCKET", "/tmp/env.sock")
    assert parse(["-L"]).socket == "/tmp/env.sock"
    assert parse(["-L", "--socket", "/tmp/opt.sock"]).socket == "/tmp/opt.sock"


# -- requests ---------------------------------------------------------------------------------------
def test_change_commands_send_only_what_was_given():
    assert run(["-A", "-V", VIP])[0] == [("add-service", {"service": {"vip": VIP}})]
    assert run(["-A", "-V", VIP, "--method", "nat", "--no-ah", "-s", "sh", "-M", "255.255.255.255",
                "-p", "600", "--soft-limit", "10", "--soft-grace", "3"])[0] == [
        ("add-service", {"service": {"vip": VIP, "ah": False, "scheduler": "sh", "method": "nat",
                                     "affinity": "ip", "affinity_prefix": 0, "timeouts": {"established": 600},
                                     "soft_expiry": {"limit": 10, "grace": 3}}})]
    assert run(["-E", "-V", VIP, "--init-timeout", "5"])[0] == [
        ("edit-service", {"vip": VIP, "changes": {"timeouts": {"init": 5}}})]
    # a new scheduler starts without the old one's options unless some are given
    assert run(["-E", "-V", VIP, "-s", "rr"])[0] == [
        ("edit-service", {"vip": VIP, "changes": {"scheduler": "rr", "scheduler_options": {}}})]
    assert run(["-E", "-V", VIP, "-s", "mh", "--scheduler-option", "table_size=7"])[0] == [
        ("edit-service", {"vip": VIP, "changes": {"scheduler": "mh", "scheduler_options": {"table_size": 7}}})]
    assert run(["-D", "-V", VIP])[0] == [("del-service", {"vip": VIP})]
    assert run(["-C"])[0] == [("clear", {})]
    assert run(["-a", "-V", VIP, "-r", RIP1, "-i", "-w", "0", "-x", "9"])[0] == [
        ("add-server", {"vip": VIP, "server": {"address": RIP1, "method": "tun", "weight": 0, "u_threshold": 9}})]
    assert run(["-e", "-V", VIP, "-r", RIP1, "-y", "2"])[0] == [
        ("edit-server", {"vip": VIP, "address": RIP1, "changes": {"l_threshold": 2}})]
    assert run(["-d", "-V", VIP, "-r", RIP1])[0] == [("del-server", {"vip": VIP, "address": RIP1})]
    assert run(["-Z"])[0] == [("zero", {})]
    assert run(["-Z", "-V", VIP])[0] == [("zero", {"vip": VIP})]


def test_scheduler_flags_and_quiescent_expiry_become_settings():
    assert run(["-A", "-V", VIP, "-s", "mh", "-b", "mh-fallback,mh-port", "--expire-quiescent"])[0] == [
        ("add-service", {"service": {"vip": VIP, "scheduler": "mh", "expire_quiescent": True,
                                     "scheduler_options": {"fallback": True, "port": True}}})]
    assert run(["-A", "-V", VIP, "-s", "mh", "-b", "mh-port", "--scheduler-option", "table_size=251"])[0] == [
        ("add-service", {"service": {"vip": VIP, "scheduler": "mh",
                                     "scheduler_options": {"table_size": 251, "port": True}}})]
    # -E -b states the scheduler's whole option set, as ipvsadm -E -b does
    assert run(["-E", "-V", VIP, "-b", "mh-port", "--no-expire-quiescent"])[0] == [
        ("edit-service", {"vip": VIP, "changes": {"scheduler_options": {"port": True},
                                                  "expire_quiescent": False}})]
    assert run(["-A", "-V", VIP, "-s", "sh", "-b", "sh-fallback"])[0] == [
        ("add-service", {"service": {"vip": VIP, "scheduler": "sh", "scheduler_options": {"fallback": True}}})]


@pytest.mark.parametrize("argv,message", [
    (["-A", "-V", VIP, "-s", "mh", "-b", "mh-bogus"], "-b mh-bogus: unknown scheduler flag 'mh-bogus' "
                                                      "(known: sh-fallback, mh-fallback, mh-port)"),
    (["-A", "-V", VIP, "-s", "wlc", "-b", "mh-port"], "-b mh-port: a flag of the mh scheduler, not of wlc"),
    (["-A", "-V", VIP, "-s", "mh", "-b", "mh-fallback", "--scheduler-option", "fallback=false"],
     "-b mh-fallback and --scheduler-option fallback=false disagree"),
    (["-A", "-V", VIP, "--expire-quiescent", "--no-expire-quiescent"],
     "conflicting options: --expire-quiescent and --no-expire-quiescent with -A"),
    (["-a", "-V", VIP, "-r", RIP1, "--expire-quiescent"], "illegal option combination: -a with --expire-quiescent"),
])
def test_bad_scheduler_flags_and_quiescent_options(argv, message):
    with pytest.raises(UsageError) as e:
        run(argv)
    assert str(e.value) == message


def test_set_zero_means_unchanged():
    assert run(["--set", "20", "7200"])[0] == [("set-timeouts", {"init": 20, "established": 7200})]
    assert run(["--set", "0", "7200", "0"])[0] == [("set-timeouts", {"established": 7200})]
    assert run(["--set", "20", "0"])[0] == [("set-timeouts", {"init": 20})]
    assert run(["--set", "0", "0"])[0] == []


# -- -S and -R ----------------------------------------------------------------------------------------
SAVED = [  # a `save` answer: config.to_dict's service tables
    {"vip": VIP, "scheduler": "wlc", "method": "dr", "affinity": "ip", "ah": True,
     "timeouts": {"init": 30.0, "established": 16200.0}, "retransmit_threshold": 3,
     "server": [{"address": RIP1, "weight": 1}, {"address": RIP2, "weight": 0, "method": "tun",
                                                  "u_threshold": 100, "l_threshold": 50}]},
    {"vip": VIP2, "scheduler": "mh", "method": "nat", "affinity": "ip-port", "ah": False,
     "timeouts": {"init": 2.5, "established": 600.0}, "retransmit_threshold": 0,
     "scheduler_options": {"table_size": 251}, "soft_expiry": {"limit": 1000, "grace": 5.0},
     "server": [{"address": RIP1, "weight": 3}]},
    {"vip": "192.0.2.30", "scheduler": "sh", "method": "dr", "affinity": "ip", "ah": True,
     "timeouts": {"init": 30.0, "established": 16200.0}, "retransmit_threshold": 3,
     "scheduler_options": {"fallback": False}, "server": []},
    {"vip": "192.0.2.40", "scheduler": "mh", "method": "dr", "affinity": "ip-port", "ah": True,
     "timeouts": {"init": 30.0, "established": 16200.0}, "retransmit_threshold": 3,
     "scheduler_options": {"fallback": True, "port": True, "table_size": 251}, "expire_quiescent": True,
     "server": [{"address": RIP1, "weight": 1}]},
    {"vip": "192.0.2.41", "scheduler": "mh", "method": "dr", "affinity": "ip", "ah": True,
     "timeouts": {"init": 30.0, "established": 16200.0}, "retransmit_threshold": 3,
     "scheduler_options": {"fallback": False, "port": True}, "server": []},
    {"vip": "192.0.2.42", "scheduler": "twos", "method": "dr", "affinity": "ip", "ah": True,
     "timeouts": {"init": 30.0, "established": 16200.0}, "retransmit_threshold": 3, "server": []},
    {"vip": "192.0.2.43", "scheduler": "mh", "method": "dr", "affinity": "ip", "ah": True,
     "timeouts": {"init": 30.0, "established": 16200.0}, "retransmit_threshold": 3,
     "spi_label": {"mask": "0x00000000ff000000"}, "ingress": {"esp_pps": 50, "ike_pps": 20, "burst": 40},
     "server": [{"address": RIP1, "weight": 1, "spi_label": "0x0000000041000000", "esp_spi_min": 0x41000000,
                 "esp_spi_max": 0x41FFFFFF},
                {"address": RIP2, "weight": 1, "spi_label": "0x0000000042000000"}]},
]
SAVED_TEXT = f"""\
-A -V {VIP} -s wlc
-a -V {VIP} -r {RIP1} -w 1
-a -V {VIP} -r {RIP2} -i -w 0 -x 100 -y 50
-A -V {VIP2} -s mh --scheduler-option table_size=251 --method nat --affinity ip-port --no-ah --init-timeout 2.5 \
-p 600 --retransmit-threshold 0 --soft-limit 1000 --soft-grace 5
-a -V {VIP2} -r {RIP1} -w 3
-A -V 192.0.2.30 -s sh --scheduler-option fallback=false
-A -V 192.0.2.40 -s mh -b mh-fallback,mh-port --scheduler-option table_size=251 --affinity ip-port \
--expire-quiescent
-a -V 192.0.2.40 -r {RIP1} -w 1
-A -V 192.0.2.41 -s mh -b mh-port --scheduler-option fallback=false
-A -V 192.0.2.42 -s twos
-A -V 192.0.2.43 -s mh --spi-label-mask 0x00000000ff000000 --ingress esp_pps=50 --ingress ike_pps=20 \
--ingress burst=40
-a -V 192.0.2.43 -r {RIP1} -w 1 --spi-label 0x0000000041000000 --esp-spi-min 0x41000000 --esp-spi-max 0x41ffffff
-a -V 192.0.2.43 -r {RIP2} -w 1 --spi-label 0x0000000042000000
"""


def test_canned_save_answer_is_what_the_daemon_sends():
    assert to_dict(from_dict({"service": SAVED}))["service"] == SAVED


def test_save_prints_one_line_per_service_and_server():
    requests, out = run(["-S"], save=SAVED)
    assert requests == [("save", {})]
    assert out == SAVED_TEXT


def test_restore_parses_save_text_back_to_the_same_services():
    services = cli.parse_restore(SAVED_TEXT)
    assert to_dict(from_dict({"service": services}))["service"] == SAVED
    assert "".join(line + "\n" for line in cli.save_lines(to_dict(from_dict({"service": services}))["service"])) \
        == SAVED_TEXT


def test_restore_sends_one_request():
    class Stdin:
        def read(self):
            return "# saved by vpnadm -S\n\n" + SAVED_TEXT
    requests, out = run(["-R"], stdin=Stdin())
    assert [cmd for cmd, _ in requests] == ["restore"]
    assert to_dict(from_dict({"service": requests[0][1]["services"]}))["service"] == SAVED
    assert out == ""


@pytest.mark.parametrize("text,message", [
    (f"-a -V {VIP} -r {RIP1}\n", f"-R line 1: -a for {VIP} before its -A line"),
    (f"-A -V {VIP}\n-L\n", "-R line 2: only -A and -a lines can be restored, not -L"),
    (f"-A -V {VIP}\n-a -V {VIP} -r {RIP1} -w x\n", "-R line 2: -w: not an integer: 'x'"),
    (f"-A -V {VIP} --socket /x\n", "-R line 1: --socket has no place in restore input"),
    (f"-A -V '{VIP}\n", "-R line 1: No closing quotation"),
    ("# nothing\n\n", "-R: no -A line on stdin"),
])
def test_restore_input_errors_name_the_line(text, message):
    with pytest.raises(UsageError) as e:
        cli.parse_restore(text)
    assert str(e.value).startswith(message)


def test_spi_label_options_build_the_settings_and_reject_bad_numbers():
    reqs, _ = run(["-A", "-V", VIP, "-s", "mh", "--spi-label-mask", "0xff00000000000000"])
    assert reqs[0][1]["service"]["spi_label"] == {"mask": "0xff00000000000000"}
    reqs, _ = run(["-e", "-V", VIP, "-r", RIP1, "--spi-label", "0x4100000000000000", "--esp-spi-min", "1090519040",
                   "--esp-spi-max", "0x41ffffff"])
    assert reqs[0][1]["changes"] == {"spi_label": "0x4100000000000000", "esp_spi_min": 0x41000000,
                                     "esp_spi_max": 0x41FFFFFF}
    for value, message in (("0x1_0000_0000", "--esp-spi-min: must be 0..0xffffffff, got '0x1_0000_0000'"),
                           ("-1", "--esp-spi-min: must be 0..0xffffffff, got '-1'"),
                           ("41x", "--esp-spi-min: not an integer (decimal or 0x hex): '41x'")):
        with pytest.raises(UsageError) as e:
            run(["-a", "-V", VIP, "-r", RIP1, "--esp-spi-min", value])
        assert str(e.value) == message
    with pytest.raises(UsageError, match="illegal option combination: -A with --spi-label$"):
        run(["-A", "-V", VIP, "--spi-label", "0x1"])


def test_save_refuses_a_setting_it_cannot_spell():
    future = [{**SAVED[0], "weekday_only": True}]
    with pytest.raises(cli.Refused, match="weekday_only"):
        run(["-S"], save=future)


# -- listings ----------------------------------------------------------------------------------------
def _server(address, weight=1, method="dr", active=0, inactive=0, stats=(0, 0, 0, 0, 0), rates=(0, 0, 0, 0, 0)):
    return {"id": 0, "address": address, "weight": weight, "method": method, "active": active,
            "inactive": inactive, "up": True, "u_threshold": 0, "l_threshold": 0,
            "stats": dict(zip(cli._STATS, stats)), "rates": dict(zip(cli._RATES, rates))}


SERVICES = [
    {"vip": VIP, "scheduler": "wlc", "method": "dr", "affinity": "ip", "ah": True,
     "timeouts": {"init": 30.0, "established": 16200.0},
     "stats": dict(zip(cli._STATS, (3, 123_456_789, 0, 123_456_789_012, 100_000_000_000_000))),
     "rates": dict(zip(cli._RATES, (1.5, 10.4, 0.0, 1234.6, 0.0))),
     "servers": [_server(RIP1, 2, active=1, inactive=2,
                         stats=(3, 123_456_789, 0, 123_456_789_012, 100_000_000_000_000),
                         rates=(1.5, 10.4, 0.0, 1234.6, 0.0)),
                 _server(RIP2, 0, "tun")]},
    {"vip": VIP2, "scheduler": "rr", "method": "nat", "affinity": "ip-port", "ah": False,
     "timeouts": {"init": 2.5, "established": 600.0},
     "stats": dict(zip(cli._STATS, (0,) * 5)), "rates": dict(zip(cli._RATES, (0,) * 5)),
     "servers": [_server(RIP1, 1, "nat", inactive=7)]},
]
HEAD = "IPsec Virtual Server (vpn-director 0.1.0)\n"


def test_list_like_ipvsadm():
    _, out = run(["-L", "-n"], services=SERVICES)
    assert out == HEAD + f"""\
Prot LocalAddress Scheduler Flags
  -> RemoteAddress                Forward Weight ActiveConn InActConn
IPSEC  {VIP} wlc affinity ip 16200
  -> {RIP1}                 Route   2      1          2
  -> {RIP2}                 Tunnel  0      0          0
IPSEC  {VIP2} rr affinity ip-port 600 no-ah
  -> {RIP1}                 Masq    1      0          7
"""


def test_list_stats_in_human_units_and_exact():
    _, out = run(["-L", "--stats"], services=SERVICES[:1])
    assert out == HEAD + f"""\
Prot LocalAddress                    Conns   InPkts  OutPkts  InBytes OutBytes
  -> RemoteAddress
IPSEC  {VIP}                        3  123456K        0     123G     100T
  -> {RIP1}                        3  123456K        0     123G     100T
  -> {RIP2}                        0        0        0        0        0
"""
    _, out = run(["-L", "--stats", "--exact"], services=SERVICES[:1])
    assert out.splitlines()[3].split() == ["IPSEC", VIP, "3", "123456789", "0", "123456789012", "100000000000000"]
    assert out.splitlines()[3].endswith("        3 123456789        0 123456789012 100000000000000")


@pytest.mark.parametrize("n,text", [
    (99_999_999, " 99999999"), (100_000_000, "  100000K"), (999_999_999, "  999999K"),
    (1_000_000_000, "    1000M"), (99_999_999_999, "   99999M"), (100_000_000_000, "     100G"),
    (10**14, "     100T"),
])
def test_largenum_thresholds_as_ipvsadm(n, text):
    assert cli.largenum(n) == text
    assert cli.largenum(n, exact=True).strip() == str(n)


def test_list_rate_timeout_thresholds():
    _, out = run(["-L", "--rate"], services=SERVICES[:1])
    assert out.splitlines()[1].split() == ["Prot", "LocalAddress", "CPS", "InPPS", "OutPPS", "InBPS", "OutBPS"]
    assert out.splitlines()[3].split() == ["IPSEC", VIP, "1", "10", "0", "1234", "0"]
    _, out = run(["-L", "--timeout"], services=SERVICES)
    assert [line.split() for line in out.splitlines()[2:]] == [["IPSEC", VIP, "30", "16200"],
                                                              ["IPSEC", VIP2, "2.5", "600"]]
    _, out = run(["-L", "--thresholds"], services=SERVICES[1:])
    assert out.splitlines()[-1].split() == ["->", RIP1, "0", "0", "0", "7"]


def test_list_one_service_and_json():
    requests, out = run(["-L", "-V", VIP2, "--json"], services=SERVICES)
    assert requests == [("services", {})]
    assert json.loads(out) == SERVICES[1:]
    with pytest.raises(cli.Refused, match="vip: no service 192.0.2.99"):
        run(["-L", "-V", "192.0.2.99"], services=SERVICES)


CONNS = [
    {"svc": 1, "client": "203.0.113.5", "port": 4500, "state": "ESTABLISHED", "spi_i": "00000000000000aa",
     "spi_r": "00000000000000bb", "rs": 0, "rs_address": RIP1, "expires_in": 16199.7, "natt": True},
    {"svc": 1, "client": "203.0.113.6", "port": 500, "state": "INIT", "spi_i": "00000000000000cc",
     "spi_r": "0000000000000000", "rs": 1, "rs_address": RIP2, "expires_in": -0.2, "natt": False},
]


def test_list_connections_with_ipsec_columns():
    requests, out = run(["-L", "-c", "--client", "203.0.113.5", "--server", RIP1], connections=CONNS,
                        status={"services": [{"id": 1, "vip": VIP}]})
    assert requests[0] == ("connections", {"client": "203.0.113.5", "server": RIP1})
    lines = out.splitlines()
    assert lines[0] == "IPsec connection entries"
    assert lines[1].split() == ["pro", "expire", "state", "source", "virtual", "destination",
                                "initiator-cookie", "responder-cookie", "nat-t"]
    assert lines[2].split() == ["IPSEC", "269:59", "ESTABLISHED", "203.0.113.5:4500", VIP, RIP1,
                                "00000000000000aa", "00000000000000bb", "yes"]
    assert lines[3].split() == ["IPSEC", "00:00", "INIT", "203.0.113.6:500", VIP, RIP2,
                                "00000000000000cc", "0000000000000000", "no"]
    requests, out = run(["-L", "-c", "--json"], connections=CONNS)
    assert requests == [("connections", {})]  # the JSON is the daemon's answer, nothing added
    assert json.loads(out) == CONNS


# -- main: exit codes and messages --------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["-a", "-V", VIP, "-r", RIP1, "--stats"], ["--bogus"], ["-a", "-V", VIP, "-r", RIP1, "-w", "x"],
    ["-A", "-V", VIP, "-M", "255.0.255.0"], ["-L", "-Z"], ["-u", "192.0.2.1:500"],
])
def test_bad_invocation_exits_2_with_one_line(argv, capsys, monkeypatch):
    monkeypatch.setattr(cli, "control_request", lambda *a, **k: pytest.fail("no request may be sent"))
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("vpnadm: ") and err.count("\n") == 1


def test_refusal_exits_1_with_the_daemons_line(capsys, monkeypatch):
    sent = []

    def refuse(path, request, timeout=5.0):
        sent.append((path, request))
        return {"ok": False, "error": "service.server[0].weight: must be 0..65535, got 70000"}

    monkeypatch.setattr(cli, "control_request", refuse)
    assert cli.main(["--socket", "/s", "-a", "-V", VIP, "-r", RIP1, "-w", "70000"]) == 1
    assert capsys.readouterr().err == "vpnadm: service.server[0].weight: must be 0..65535, got 70000\n"
    assert sent == [("/s", {"cmd": "add-server", "vip": VIP, "server": {"address": RIP1, "weight": 70000}})]


def test_unreachable_daemon_exits_3(capsys, tmp_path):
    path = tmp_path / "nobody.sock"
    assert cli.main(["--socket", str(path), "-L"]) == 3
    assert capsys.readouterr().err == f"vpnadm: cannot reach vpn-director at {path}: No such file or directory\n"


def test_help_exits_0_and_shows_every_row(capsys):
    assert cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    for row in ("vpnadm -A -V ADDRESS", "vpnadm -a -V ADDRESS -r RIP", "vpnadm -L|-l -c",
                "vpnadm --set INIT ESTABLISHED", "vpnadm -R < FILE", "vpnadm -S [-n]", "vpnadm -Z [-V ADDRESS]",
                "ipvsadm's -t/-u/-f do not apply"):
        assert row in out



def test_listing_flags_a_server_marked_down():
    from director.cli import format_services

    svc = {"vip": "192.0.2.10", "scheduler": "rr", "affinity": "ip", "ah": True,
           "timeouts": {"init": 30, "established": 16200}, "stats": {}, "rates": {},
           "servers": [{"address": "198.51.100.1", "method": "dr", "weight": 1, "active": 2, "inactive": 0, "up": True},
                       {"address": "198.51.100.2", "method": "dr", "weight": 1, "active": 0, "inactive": 0, "up": False}]}
    lines = format_services([svc]).splitlines()
    assert lines[-2].split()[-1] == "0" and not lines[-2].endswith("down")
    assert lines[-1].endswith(" down")


# -- route health injection: drain and the announcement in -L -------------------------------------
def test_drain_and_undrain_send_the_vip_or_nothing():
    reqs, out = run(["--drain", "-V", VIP], drain="192.0.2.10 drained: 192.0.2.10 withdrawn")
    assert reqs == [("drain", {"vip": VIP})]
    assert out == "192.0.2.10 drained: 192.0.2.10 withdrawn\n"
    reqs, _ = run(["--undrain"])
    assert reqs == [("undrain", {})]


def test_a_drained_service_round_trips_through_save_and_restore():
    cfg = from_dict({"service": [{"vip": VIP, "drain": True, "server": [{"address": RIP1}]},
                                 {"vip": VIP2, "server": []}]})
    lines = list(cli.save_lines(to_dict(cfg)["service"]))
    assert lines[0].endswith("--drained") and "--drained" not in lines[2]
    restored = cli.parse_restore("\n".join(lines))
    assert from_dict({"service": restored}).services == cfg.services


def test_the_listing_shows_each_vips_announcement_and_the_bgp_sessions():
    cfg = from_dict({"service": [{"vip": VIP, "server": [{"address": RIP1}]}, {"vip": VIP2, "server": []}]})
    services = []
    for s, ann in zip(to_dict(cfg)["service"], ({"announced": True, "wanted": True, "reason": None},
                                                 {"announced": False, "wanted": False, "reason": "no_healthy_server"})):
        services.append({"vip": s["vip"], "scheduler": "wlc", "affinity": "ip", "ah": True,
                         "timeouts": s["timeouts"], "servers": [], "announcement": ann,
                         "bgp_sessions": {"uplink": "Established", "backup": "Active"}})
    text = cli.format_services(services)
    assert f"IPSEC  {VIP} wlc affinity ip 16200 announced\n" in text
    assert f"IPSEC  {VIP2} wlc affinity ip 16200 withdrawn(no_healthy_server)\n" in text
    assert text.endswith("BGP sessions: backup Active, uplink Established\n")
    plain = [{k: v for k, v in s.items() if k not in ("announcement", "bgp_sessions")} for s in services]
    assert "BGP" not in cli.format_services(plain) and "announced" not in cli.format_services(plain)


def test_listing_shows_scheduler_flags_and_quiescent_expiry_as_ipvsadm_shows_flags():
    svc = {**SERVICES[1], "scheduler": "mh", "scheduler_options": {"port": True, "table_size": 251},
           "expire_quiescent": True}
    line = cli.format_services([svc]).splitlines()[3]
    assert line == f"IPSEC  {VIP2} mh (mh-port) affinity ip-port 600 expire-quiescent no-ah"
    assert cli.format_services([SERVICES[1]]).splitlines()[3] == f"IPSEC  {VIP2} rr affinity ip-port 600 no-ah"


def test_list_drops_shows_every_counted_reason_with_the_kernel_part():
    status = {"drops": {"NO_ENTRY": 10, "INGRESS_ESP_LIMITED": 290, "IP_TRUNCATED": 1},
              "fastpath": {"drops": {"INGRESS_ESP_LIMITED": 285}}}
    requests, out = run(["-L", "--drops"], status=status)
    assert requests == [("status", {})]
    assert out.splitlines() == [
        "Reason                   Code      Packets     InKernel",
        "IP_TRUNCATED                1            1            0",
        "NO_ENTRY                   50           10            0",
        "INGRESS_ESP_LIMITED        75          290          285",
    ]
    with pytest.raises(UsageError, match="-L --drops with -V"):
        run(["-L", "--drops", "-V", VIP], status=status)
    with pytest.raises(UsageError, match="conflicting options"):
        run(["-L", "--drops", "--stats"], status=status)
