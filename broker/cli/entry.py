"""The ``edgesync`` console script (and ``python -m broker``): the lean path first.

``edgesync bridge`` with no further arguments starts the bridge without
loading the command line (:func:`broker.cli.services.bridge_main`); everything
else, ``edgesync bridge --help`` included, goes to :mod:`broker.cli.main`.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Run the command named by ``sys.argv``."""
    if sys.argv[1:] == ["bridge"]:
        from broker.cli.services import bridge_main

        sys.exit(bridge_main())
    from broker.cli.main import main as cli_main

    cli_main()
