"""edgesync benchmarks: every hop of the pipeline beside its ceiling and its baselines.

``python -m bench`` (or ``edgesync bench``) starts its own nats-server and
PostgreSQL, runs the six scenarios with their baselines in the same run, prints
the results table and writes ``bench/results/<timestamp>.json``. See
``bench/README.md`` for the scenarios, the targets and the latest full results.
"""
