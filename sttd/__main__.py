"""``python -m sttd``: the ``sttd`` command (`sttd.cli.main`)."""

import sys

from sttd.cli import main

if __name__ == "__main__":
    sys.exit(main())
