"""``python -m leaderboard`` is the ``leaderboard`` console script."""

import sys

from leaderboard.cli import main

sys.exit(main())
