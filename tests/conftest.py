import os

import pytest

from astaire.demo.localcluster import LocalCluster, MemcachedServer, run_build_script
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


@pytest.fixture(scope="session")
def memcached_flags() -> str:
    """A stock memcached recent enough (1.6.24 on) to list flags in ``lru_crawler metadump``:
    1.6.38, built from Debian's source by scripts/build-memcached on first use."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "build-memcached")
    try:
        return run_build_script(script, "memcached 1.6.38")
    except RuntimeError as e:
        pytest.fail(str(e))


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
