"""Reference benchmark for privacy-preserving chest X-ray AI.

The package holds everything that is not a privacy technique: the CLI, the harness
that measures, data, models, metrics, results, leaderboard and report. Techniques
live in the top-level ``backends`` package and are found through entry points.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 2   # 2: typed qualifiers (network, estimate, round) and the audit phase
