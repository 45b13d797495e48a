"""Benchmarks behind ``mixprec bench``: each measures mixprec against baselines timed in
the same run and reports ratios, since absolute times on shared machines are noise."""
