"""The cloud side: JetStream -> PostgreSQL ingest workers, the schema and its
migrations, edge tracking from heartbeats, and (later) the operator API."""
