"""`python -m rgpt4d ...` runs the `rgpt4d` command."""

import sys

from rgpt4d.cli import main

if __name__ == "__main__":
    sys.exit(main())
