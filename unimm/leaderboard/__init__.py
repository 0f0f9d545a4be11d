"""The cross-family leaderboard (DuckDB over results.json files in place) and the per-query results browser.

``python -m unimm.leaderboard --help``; see :mod:`unimm.leaderboard.gather`, :mod:`~unimm.leaderboard.render`,
:mod:`~unimm.leaderboard.browser`.
"""
