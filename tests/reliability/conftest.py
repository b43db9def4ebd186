"""The reliability suite reuses the workflow tests' real Temporal dev server and worker."""

from tests.workflows.conftest import address, loop_client, tclient, temporal, worker

__all__ = ["address", "loop_client", "tclient", "temporal", "worker"]
