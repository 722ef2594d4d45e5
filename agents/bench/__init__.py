"""Benchmarks: suites (:mod:`.suite`), runs on Ray (:mod:`.runner`), records (:mod:`.records`),
the report (:mod:`.report`, :mod:`.stats`), the alternated speed suite (:mod:`.speed`) and
hyperparameter sweeps with Ray Tune (:mod:`.sweep`).

Nothing is imported here: each module pulls in what it needs (Ray, pandas, rliable), so that
reading a suite file does not import them all.
"""
