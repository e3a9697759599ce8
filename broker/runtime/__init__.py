"""The embedded runtime: a local nats-server and PostgreSQL as child processes
that stop when their parent dies, for ``edgesync up``, tests and benchmarks."""
