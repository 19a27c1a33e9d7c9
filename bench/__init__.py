"""The benchmark harness of issue 5: ``make bench`` (``python -m bench.run``)."""
