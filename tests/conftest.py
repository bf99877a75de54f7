import pytest

from astaire.demo.localcluster import LocalCluster, MemcachedServer
from tests.codec_impls import tap  # noqa: F401 (a fixture: the codec and Writer tests run once per build)
from tests.daemon_helpers import daemons, servers, tap_resize, taps  # noqa: F401 (fixtures for the end-to-end tests)
from tests.snmp_helpers import snmp_agents, trapd  # noqa: F401 (fixtures for the SNMP tests)
from tests.throttle_helpers import group_name  # noqa: F401 (a fixture for the throttle tests)
from tests.drills import drill, freezers, netns, nodes, tap_fork  # noqa: F401 (fixtures for the fault drills)


@pytest.fixture
def memcached():
    """One real memcached on loopback, stopped after the test."""
    with MemcachedServer(memory_mb=64) as server:
        yield server


@pytest.fixture
def cluster_factory():
    """Start ``LocalCluster(n)``s on demand; all are stopped after the test."""
    started = []

    def make(n: int, **kwargs) -> LocalCluster:
        c = LocalCluster(n, **kwargs).start()
        started.append(c)
        return c

    yield make
    for c in started:
        c.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests import drills_report

    drills_report.summary(terminalreporter, str(config.rootpath))
