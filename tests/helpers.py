"""Kept so that ``from tests.helpers import until`` goes on working; the helpers live in
:mod:`tests.support`."""

from tests.support import PgCluster, dsn_from_env, until

__all__ = ["PgCluster", "dsn_from_env", "until"]
