"""The leaderboard: published references, aggregation of result files, tables, plots and regression checks.

Torch-free by design: it imports only pandas, tabulate, matplotlib, the standard library and
``benchmark.protocol`` / ``benchmark.results`` (both stdlib-only), so CI can build and check the
leaderboard without the training stack. ``tests/test_leaderboard*.py`` proves it.

Modules: ``data`` (published rows and other CSV data), ``runs`` (finding, validating and loading
result files), ``aggregate`` (pandas grouping, Δm), ``tables`` (markdown/CSV), ``plot`` (Δm vs
parameters with the Pareto front), ``checks`` (what CI runs), ``cli`` (``leaderboard build|check|validate``).
"""
