"""The workload helper loads MemcachedStore-shaped records where the view says, and its
placement check catches missing, wrong and misplaced copies (it guards the e2e tests)."""
import pytest

from astaire.demo import workload
from astaire.cluster.view import ClusterView, vbucket_for_key


def test_load_puts_each_record_on_its_replicas_only(cluster_factory):
    cluster = cluster_factory(3, memory_mb=64)
    view = ClusterView(cluster.names)
    records = list(workload.make_records(3000, 50))
    assert workload.load(view, records) == 3000
    expected = workload.expected_holders(records, view, view, copied_to=[])
    report = workload.check_placement(records, expected, cluster.names)
    assert report.ok, report
    assert report.checked == 2 * 3000


def test_placement_check_reports_missing_wrong_and_misplaced(cluster_factory):
    cluster = cluster_factory(2, memory_mb=64)
    a, b = cluster.names
    view = ClusterView([a, b])
    records = list(workload.make_records(500, 20))
    workload.load(view, records)
    # Claim every record should be only on a: b's copies are misplaced; then damage a's copies.
    with workload.BinaryClient(a) as client:
        r0, r1 = records[0], records[1]
        client.round_trip(workload.codec.encode_delete(r0.key) + workload.codec.encode_set(r1.key, b"other", r1.flags, r1.expiration))
    expected = {a: {r.key for r in records}}
    report = workload.check_placement(records, expected, [a, b], limit=10_000)
    assert (a, r0.key) in report.missing
    assert any(w[0] == a and w[1] == r1.key for w in report.wrong)
    on_b = [r.key for r in records if b in view.current[vbucket_for_key(r.key)]]
    assert len(report.misplaced) == len(on_b) and not report.ok


def test_records_carry_memcachedstore_layout():
    r = next(workload.make_records(1, 10, table="reg"))
    assert r.key == b"reg\\\\key-0" and len(r.value) == 10 and 0 <= r.flags < 2**32 and r.expiration > 0


def test_metadump_lists_every_item_right_after_a_bulk_load(cluster_factory):
    """The hash-table walk: memcached's LRU maintainer is busiest right after a bulk load, when
    the LRU walk (``metadump all``) could miss items it moved; the check must not call them
    missing."""
    cluster = cluster_factory(1, memory_mb=64)
    (name,) = cluster.names
    records = list(workload.make_records(20000, 100, table="dump"))
    workload.load(ClusterView([name]), records)
    listed = workload.metadump(name)
    assert set(listed) == {r.key for r in records}
    assert {listed[r.key] for r in records} == {records[0].expiration}


def test_metadump_falls_back_to_the_lru_walk_where_the_hash_walk_is_refused():
    from tests.test_drills_bad_input import FakeCrawler

    server = FakeCrawler(b"key=t%5C%5Ca exp=-1 la=1 cas=1 fetch=no cls=1 size=70\n"
                         b"key=t%5C%5Cb exp=1900000000 la=1 cas=2 fetch=no cls=1 size=70\n"
                         b"END\r\n", refuse_hash=True)
    try:
        listed = workload.metadump(server.name, timeout=5)
    finally:
        server.stop()
    assert listed == {b"t\\\\a": 0, b"t\\\\b": 1900000000}
    assert server.commands == [b"lru_crawler metadump hash", b"lru_crawler metadump all"]


def test_metadump_of_a_server_without_a_crawler_is_a_clear_error(tap_fork):
    from tests.drills import Node

    with Node("fork") as fork:
        with pytest.raises(ConnectionError, match="cannot list its items: lru_crawler metadump answered 'ERROR'"):
            workload.metadump(fork.name, timeout=5)
