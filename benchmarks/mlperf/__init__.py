"""MLPerf-Storage-style benchmark: emulated accelerators, accelerator utilisation (AU), and how many
accelerators each storage backend keeps above the AU floor.

    python -m benchmarks.mlperf                 # full run (about 10-15 minutes on 2 cores)
    python -m benchmarks.mlperf --smoke --out /tmp/x   # tiny, N in {1, 2}, under 5 minutes

See docs/mlperf.md for what is emulated, what ``--scale`` does, and how to read the results.
"""
