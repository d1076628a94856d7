"""``facemoe bench``: throughput and latency of every backend x precision x batch size.

``source`` says what is measured (a bundle or a model built here), ``sweep`` opens each backend and times
it, ``report`` holds the rows and writes them as JSON, markdown or a table.
"""

from facemoe.bench.report import BENCH_FORMAT, BENCH_SCHEMA_VERSION, BenchReport, BenchRow
from facemoe.bench.source import BenchSource, prepare_source
from facemoe.bench.sweep import BACKENDS, BenchConfig, environment, run_bench, time_backend
from facemoe.runtime.backends.base import peak_rss_bytes

__all__ = [
    "BACKENDS",
    "BENCH_FORMAT",
    "BENCH_SCHEMA_VERSION",
    "BenchConfig",
    "BenchReport",
    "BenchRow",
    "BenchSource",
    "environment",
    "peak_rss_bytes",
    "prepare_source",
    "run_bench",
    "time_backend",
]
