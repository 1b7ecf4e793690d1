"""The server process's garbage collector: start-up's objects frozen out of its walks, every collection's pause
counted (services/serving/gc_pauses.py)."""
import gc

from services.serving.gc_pauses import Pauses, freeze_start_up


def test_every_collection_is_counted_by_generation_with_its_pause_until_closed():
    pauses = Pauses()
    try:
        before = pauses.snapshot()
        gc.collect(0)
        gc.collect(2)
        after = pauses.snapshot()
        assert after["collections"][0] >= before["collections"][0] + 1
        assert after["collections"][2] >= before["collections"][2] + 1
        assert after["seconds"][2] > before["seconds"][2] and after["longest_s"] > 0
        assert after["longest_s"] <= max(after["seconds"])
    finally:
        pauses.close()
    assert pauses._callback not in gc.callbacks
    gc.collect(2)
    assert pauses.snapshot()["collections"] == after["collections"]  # closed: no longer counting


def test_freezing_start_up_takes_its_objects_out_of_every_collections_walk():
    held = [[index] for index in range(50_000)]  # what start-up leaves alive (a model, a tokenizer, a retriever)
    try:
        frozen = freeze_start_up()
        assert frozen >= len(held) and gc.get_freeze_count() == frozen
        walked = {id(obj) for obj in gc.get_objects()}  # what a full collection walks now
        assert not any(id(obj) in walked for obj in held)
        fresh = [0]  # made after start-up: walked as before
        assert id(fresh) in {id(obj) for obj in gc.get_objects()}
    finally:
        gc.unfreeze()  # (the test process goes on collecting as usual)
