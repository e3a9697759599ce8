"""The PostgreSQL server tests run against, and DSNs for it.

:class:`PgCluster` is what the ``pg_cluster`` fixture yields: either an
external server described by ``PG*`` environment variables or an embedded one.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from broker.runtime.embedded_postgres import EmbeddedPostgres

__all__ = ["PgCluster", "dsn_from_env"]


def dsn_from_env(env: Mapping[str, str] | None = None) -> str:
    """Build a DSN for the maintenance database from libpq ``PG*`` variables.

    Uses PGHOST (a host name, or a socket directory starting with ``/``),
    PGPORT, PGUSER, PGPASSWORD, PGDATABASE (default ``postgres``) and PGSSLMODE.
    """
    env = os.environ if env is None else env
    host = env["PGHOST"]
    port = env.get("PGPORT") or "5432"
    auth = quote(env.get("PGUSER") or getpass.getuser(), safe="")
    if password := env.get("PGPASSWORD"):
        auth += ":" + quote(password, safe="")
    query: dict[str, str] = {}
    if host.startswith("/"):
        netloc = f"{auth}@"
        query |= {"host": host, "port": port}
    else:
        bracketed = f"[{host}]" if ":" in host else host
        netloc = f"{auth}@{bracketed}:{port}"
    if sslmode := env.get("PGSSLMODE"):
        query["sslmode"] = sslmode
    path = "/" + quote(env.get("PGDATABASE") or "postgres", safe="")
    return urlunsplit(("postgresql", netloc, path, urlencode(query), ""))


@dataclass(frozen=True)
class PgCluster:
    """A PostgreSQL server tests may create databases on.

    Attributes:
        admin_dsn: DSN of a maintenance database, as a role allowed to create
            and drop databases.
        embedded: the embedded cluster, or None for an external server.
    """

    admin_dsn: str
    embedded: EmbeddedPostgres | None = None

    def dsn_for(self, dbname: str) -> str:
        """The admin DSN pointed at database ``dbname``."""
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))
