"""``python -m plait.runtime.snapshot.daemon``: the same as ``plait daemon``."""

import sys

from plait.runtime.snapshot.daemon.main import main

if __name__ == "__main__":
    sys.exit(main())
