"""``python3 -m stockade.agent``: run the workspace agent."""

from __future__ import annotations

import sys

from stockade.agent import main

if __name__ == "__main__":
    sys.exit(main())
