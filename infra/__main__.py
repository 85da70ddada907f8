"""`python -m infra COMMAND ...`: the `reelforge` command line from a checkout without an install
(`ray job submit --working-dir . -- python -m infra ingest ...`, `torchrun ... -m infra train ...`)."""

import sys

from infra.cli import main

sys.exit(main())
