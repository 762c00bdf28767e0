"""Config texts shared by the unit tests that run the director without a dataplane."""

# One service, rr over two real servers, short timeouts (10 s INIT, 100 s ESTABLISHED).
TWO_SERVERS = """
[[service]]
vip = "192.0.2.10"
scheduler = "rr"
timeouts = { init = 10, established = 100 }
[[service.server]]
address = "198.51.100.1"
[[service.server]]
address = "198.51.100.2"
"""
