import pytest

from tests.helpers.slurm import use_local_cluster_conf
from tests.integration.common import make_shards

# After `bash launch/slurm/local_cluster.sh start`, the SLURM tests find its config without extra environment.
use_local_cluster_conf()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Photo shards for one test module's 2-rank runs (each module gets its own copy)."""
    return make_shards(tmp_path_factory.mktemp("shards"))
