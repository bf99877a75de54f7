"""The workload helper loads MemcachedStore-shaped records where the view says, and its
placement check catches missing, wrong and misplaced copies (it guards the e2e tests)."""
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
