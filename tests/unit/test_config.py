"""The config file: every problem found and named by its path at once."""

import pytest

from director.config import ConfigErrors, parse


def test_config_errors_list_every_problem_at_once():
    with pytest.raises(ConfigErrors) as e:
        parse('[daemon]\nqueue = -1\n[[service]]\nvip = "x"\n[[service.server]]\nweight = 1\n')
    assert e.value.errors == [
        "daemon.queue: must be 0..65534, got -1",
        "service[0].vip: not an IPv4 address: 'x'",
        "service[0].server[0].address: missing",
    ]
