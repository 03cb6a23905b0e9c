import pytest

from tests.integration.common import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Photo shards for one test module's 2-rank runs (each module gets its own copy)."""
    return make_shards(tmp_path_factory.mktemp("shards"))
