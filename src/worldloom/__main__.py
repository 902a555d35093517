"""`python -m worldloom VERB ...`, the same as the `worldloom` command (and what torchrun launches:
`torchrun --nproc-per-node 2 -m worldloom train ... train.dist=ddp`)."""

import sys

from .cli import main

sys.exit(main())
