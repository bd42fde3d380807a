"""`python -m hpcllm.launcher -np N COMMAND...`: the documented command line; the code lives in
hpcllm.cluster.launcher."""

import sys

from hpcllm.cluster.launcher import main

if __name__ == "__main__":
    sys.exit(main())
