"""`python -m hpcllm.cli ...` runs the `hpcllm` command (tests launch it this way under mpirun)."""

import sys

from hpcllm.cli import main

sys.exit(main())
