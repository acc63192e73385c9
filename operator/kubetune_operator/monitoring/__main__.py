"""Regenerate (or with ``--check`` verify) every monitoring and chart file: dashboards, rules, chart README.

``python -m kubetune_operator.monitoring [--check]`` from the repository root; ``make verify`` runs it
with ``--check``.
"""

from __future__ import annotations

import sys

from kubetune_operator.monitoring import alerts, chart_readme, dashboards


def main(argv: list[str] | None = None) -> int:
    """Run the three generators with the same flags; non-zero when any of them fails."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = ["--check"] if "--check" in args else []
    results = [dashboards.main(check), alerts.main(check), chart_readme.main(check)]
    return max(results)


if __name__ == "__main__":
    raise SystemExit(main())
