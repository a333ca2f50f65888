import json

from certrotate.events import BATCH, COMPLETED, STARTED, EventQueue, current_target


def test_queue_writes_fioconfig_events_in_order(tmp_path):
    queue = EventQueue(tmp_path, clock=lambda: 1700000000.0, target=("intel-corei7-64-lmp-42", "42"))
    queue.queue(STARTED, "certs-1", success=True, point="t:1")
    queue.queue("Generate new certificate", "certs-1", success=False, details="EST said no", point="t:2")
    files = queue.pending()
    assert [f.name for f in files] == ["00000001.json", "00000002.json"]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    first, second = (json.loads(f.read_text()) for f in files)
    assert first["eventType"] == {"id": STARTED, "version": 0}
    assert first["deviceTime"] == "2023-11-14T22:13:20Z"
    assert first["event"] == {"correlationId": "certs-1", "success": True,
                              "targetName": "intel-corei7-64-lmp-42", "version": "42"}
    assert second["event"]["details"] == "EST said no" and second["event"]["success"] is False
    assert first["id"] != second["id"]


def test_failed_delivery_keeps_the_queue_and_a_later_run_sends_all_in_order(tmp_path):
    queue = EventQueue(tmp_path, clock=lambda: 0.0)
    queue.queue(STARTED, "certs-1", success=True, point="t:1")

    def unreachable(batch):
        raise ConnectionError("gateway down")

    assert queue.deliver(unreachable) is False
    assert len(queue.pending()) == 1
    later = EventQueue(tmp_path, clock=lambda: 0.0)
    later.queue(COMPLETED, "certs-1", success=True, point="t:2")
    sent = []
    assert later.deliver(sent.append) is True
    assert [[e["eventType"]["id"] for e in batch] for batch in sent] == [[STARTED, COMPLETED]]
    assert later.pending() == []
    assert later.deliver(sent.append) is True and len(sent) == 1  # nothing left to send


def test_a_long_queue_goes_in_bounded_batches_in_order(tmp_path):
    queue = EventQueue(tmp_path, clock=lambda: 0.0)
    count = 2 * BATCH + 5
    for number in range(count):
        queue.queue(STARTED, f"certs-{number}", success=True, point="t")
    sent = []

    def second_batch_fails(batch):
        if sent:
            raise ConnectionError("gateway down")
        sent.append(batch)

    # The first batch goes; the failure keeps the rest, oldest first.
    assert queue.deliver(second_batch_fails) is False
    assert [e["event"]["correlationId"] for e in sent[0]] == [f"certs-{n}" for n in range(BATCH)]
    assert len(queue.pending()) == count - BATCH
    assert json.loads(queue.pending()[0].read_text())["event"]["correlationId"] == f"certs-{BATCH}"
    later = []
    assert queue.deliver(later.append) is True
    assert [len(batch) for batch in later] == [BATCH, 5]
    assert [e["event"]["correlationId"] for batch in later for e in batch] == [
        f"certs-{n}" for n in range(BATCH, count)]
    assert queue.pending() == []


def test_sequence_continues_after_delivery(tmp_path):
    queue = EventQueue(tmp_path, clock=lambda: 0.0)
    queue.queue(STARTED, "c", success=True, point="t:1")
    queue.queue(STARTED, "c", success=True, point="t:2")
    queue.deliver(lambda batch: None)
    queue.queue(COMPLETED, "c", success=True, point="t:3")
    assert [f.name for f in queue.pending()] == ["00000001.json"]


def test_current_target(tmp_path):
    path = tmp_path / "current-target"
    path.write_text('TARGET_NAME="intel-corei7-64-lmp-7"\nCUSTOM_VERSION="7"\n')
    assert current_target(path) == ("intel-corei7-64-lmp-7", "7")
    assert current_target(tmp_path / "missing") == ("", "")
