"""Test MPI code with real ranks: the pytest plugin (`@pytest.mark.mpi`) and its fixtures.

The plugin is registered automatically through the `pytest11` entry point; see plugin.py.
"""

from hpcllm.testing.plugin import in_rank

__all__ = ["in_rank"]
