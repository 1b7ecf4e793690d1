"""On a real three-node Redis Cluster: the KV tier and the shared catalog work across slots and nodes."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest
import redis
import torch
from tests.helpers.kv import make_chunk

from retriever.chunker import Chunk
from retriever.redis_collection import SharedCollection
from services.serving.catalog import shared_prefix
from services.bench.launch import RedisProcess, free_port
from store.chunks import ChunkStore
from store.keys import chunk_key
from store.redis_tier import RedisTier, connect
from store.tiered import TieredStore


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            return port


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory):
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is not on PATH (install Debian's redis-tools)")
    folder = tmp_path_factory.mktemp("redis-cluster")
    nodes = []
    for index in range(3):
        node_dir = folder / f"node{index}"
        node_dir.mkdir()
        node = RedisProcess(None, "--cluster-enabled", "yes", "--dir", str(node_dir),
                            "--cluster-config-file", "nodes.conf", port=_cluster_port())
        node.start()
        nodes.append(node)
    try:
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        probe = redis.Redis(port=nodes[0].port)
        deadline = time.monotonic() + 30
        while b"cluster_state:ok" not in probe.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the test Redis Cluster did not reach state ok")
            time.sleep(0.1)
        probe.close()
        yield nodes[0].url, nodes
    finally:
        for node in nodes:
            node.stop()


def test_chunks_round_trip_bit_exact_through_a_cluster_with_entries_spread_over_nodes(cluster_url):
    url, nodes = cluster_url
    tier = RedisTier(url, prefix="kvblend-cluster-test:", cluster=True)
    store = ChunkStore(TieredStore([tier], [None]))
    chunks = {chunk_key("fp", (), tuple(range(seed, seed + 5)), torch.float32): make_chunk(seed) for seed in range(4)}
    for key, chunk in chunks.items():
        assert store.put(key, chunk)
    for key, chunk in chunks.items():
        assert torch.equal(store.get(key).kv, chunk.kv) and store.contains(key)
    per_node = [redis.Redis(port=node.port).dbsize() for node in nodes]
    assert sum(per_node) == len(list(tier.entries())) and sum(1 for n in per_node if n) >= 2


def test_the_shared_catalog_commits_and_replays_on_a_cluster(cluster_url, tmp_path):
    url, _ = cluster_url
    client = connect(url, cluster=True)
    prefix = shared_prefix("kvblend-cluster-test:", "default")  # one hash tag: MULTI/EXEC stays on one slot
    a = SharedCollection(client, prefix, tmp_path / "a", 4)
    b = SharedCollection(client, prefix, tmp_path / "b", 4)
    chunks = [Chunk(id=f"{n:016x}", text=f"text {n}", title="t", doc_id="d", position=0, token_ids=(n,))
              for n in range(3)]
    a.add(chunks, np.eye(4, dtype=np.float32)[:3], [(c.id, f"kv-{c.id}") for c in chunks])
    a.delete(chunks[0].id)
    assert b.refresh() and not b.stale
    assert sorted(b.mirror.docs.ids()) == [chunks[1].id, chunks[2].id]
    assert b.get(chunks[2].id).text == "text 2" and b.kv_keys(chunks[1].id) == [f"kv-{chunks[1].id}"]
    a.close()
    b.close()
    client.close()
