"""Under torchrun, each worker group meets in a store of its own, never in the previous group's."""

import datetime
import threading

import torch.distributed as dist

from ijepa_scale.distributed.env import GROUP_STORE_KEY, find_free_port, group_store


def test_a_restarted_group_skips_the_previous_groups_announcement(monkeypatch):
    port = find_free_port()
    shared = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # the agents' store
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    shared.set(GROUP_STORE_KEY, f"{find_free_port()} stale-token")  # the previous group's: its port is dead now
    shared.set("default_pg/0//cpu//0/rank_1", "the previous rank 1's address")
    timeout = datetime.timedelta(seconds=30)
    got = {}
    rank1 = threading.Thread(target=lambda: got.update(rank1=group_store(1, 2, timeout)))
    rank1.start()
    threading.Event().wait(1.0)  # rank 1 reads the stale announcement first
    got["rank0"] = group_store(0, 2, timeout)
    rank1.join(30)
    assert not rank1.is_alive()
    got["rank0"].set("hello", "from rank 0")
    assert got["rank1"].get("hello") == b"from rank 0"  # one store, the new one
    assert not got["rank1"].check(["default_pg/0//cpu//0/rank_1"])  # nothing of the previous group in it
