"""``python -m vma_async``: the ``vma`` command."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
