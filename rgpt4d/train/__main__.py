"""`python -m rgpt4d.train teacher|student ...`, also what torchrun launches:

    torchrun --nproc_per_node=2 -m rgpt4d.train student --data DIR --teacher-cache DIR --out DIR
"""

import sys

from rgpt4d.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
