"""The engine benchmark, installed with the package so that ``mosaic bench engine`` works outside a checkout.

``engine`` runs the scenarios and prints the tables, ``scenario_a`` is the one-stream comparison on equal
machinery, ``scenario_b`` the many-camera one, ``settings`` their sizes and engine configs, ``workload`` the clips'
frames and questions they feed, ``report`` formats a results JSON (scenario A's tables: ``scenario_a_report``).
Results and notes of past runs stay in the repository's ``bench/``.
"""
