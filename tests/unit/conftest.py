import pytest

from tests.helpers.photos import make_photo_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Two shards of 12 real photos (2 classes, 40x40) for trainer-level unit tests."""
    folder = tmp_path_factory.mktemp("shards")
    make_photo_shards(folder, sizes=[12, 12], num_classes=2, size=(40, 40))
    return str(folder / "train-{000000..000001}.tar")
