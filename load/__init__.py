"""Load, latency and capacity measurements for voicestack (`python -m load`, `make bench`).

  generator.py  N concurrent Converse sessions of real speech at real-time pace
  baseline.py   the same models in one process (no NATS, no gRPC) and the bus hop
  capacity.py   sessions per edge core with cheap engines (each stage's engine.py)
  bench.py      the standard set; rewrites the tables in BENCHMARKS.md
"""
