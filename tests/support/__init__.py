"""What every test suite shares: waiting, the PostgreSQL under test, services as processes.

- :func:`until`: wait on a condition with a deadline, :func:`until_in` on a resource
  reaching one of some states (``waiting``);
- :class:`PgCluster`, :func:`dsn_from_env`: the PostgreSQL tests use, and
  :func:`waiting_on_a_lock` and :func:`retrying_deadlocks` for race tests
  (``postgres``);
- :class:`ServiceProcess`, :func:`settings_env`: a service as a child process, and the
  ``EDGESYNC_*`` variables that configure it from settings objects (shipped in
  :mod:`broker.runtime.children`, because ``bench/`` uses them too and shipped code
  does not import ``tests``); :class:`BridgeProcess` builds one from ``BridgeSettings``;
  :func:`edgesync_up` runs the whole system as one child; :func:`alive` tells whether
  a pid still runs; :func:`refused_port` and :func:`port_for_config` are for the two
  cases port 0 does not cover (``processes``).
"""

from broker.runtime.children import ServiceProcess, settings_env
from tests.support.postgres import (
    PgCluster,
    database_setting,
    dsn_from_env,
    end_other_sessions,
    retrying_deadlocks,
    waiting_on_a_lock,
)
from tests.support.processes import (
    BridgeProcess,
    UpProcess,
    alive,
    edgesync_up,
    init_topology,
    port_for_config,
    refused_port,
)
from tests.support.waiting import until, until_in

__all__ = [
    "BridgeProcess",
    "PgCluster",
    "ServiceProcess",
    "UpProcess",
    "alive",
    "database_setting",
    "dsn_from_env",
    "edgesync_up",
    "end_other_sessions",
    "init_topology",
    "port_for_config",
    "refused_port",
    "retrying_deadlocks",
    "settings_env",
    "until",
    "until_in",
    "waiting_on_a_lock",
]
