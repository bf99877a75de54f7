"""The worklist: which vbuckets the local node pulls, from whom, in which rounds."""
from astaire.cluster.view import ClusterView
from astaire.cluster.worklist import Worklist

A, B, C = "10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"


def test_stable_cluster_needs_nothing_without_full_resync():
    wl = Worklist(ClusterView([A, B]), A)
    assert wl.sources == {} and wl.needing == 0 and wl.done
    assert wl.next_round() == {}


def test_full_resync_on_stable_cluster_pulls_from_the_other_replica():
    view = ClusterView([A, B, C])
    wl = Worklist(view, A, full=True)
    owned = [vb for vb in range(128) if A in view.current[vb]]
    assert sorted(wl.sources) == owned
    for vb, sources in wl.sources.items():
        assert A not in sources and sources == [s for s in view.current[vb] if s != A]


def test_scale_up_new_node_pulls_each_gained_vbucket_from_both_old_replicas():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, C)
    gained = [vb for vb in range(128) if C in view.new[vb]]
    assert sorted(wl.sources) == gained and gained
    assert all(wl.sources[vb] == view.current[vb] for vb in gained)
    assert wl.needing == sum(len(view.current[vb]) for vb in gained)


def test_rounds_take_primary_first_then_next_replica():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, C)
    first = wl.next_round()
    assert {s for s in first} <= {A, B}
    for server, vbs in first.items():
        assert all(view.current[vb][0] == server for vb in vbs)
    for server, vbs in first.items():
        wl.stream_succeeded(server, vbs)
    second = wl.next_round()
    for server, vbs in second.items():
        assert all(view.current[vb][1] == server for vb in vbs)
        wl.stream_succeeded(server, vbs)
    assert wl.next_round() == {} and wl.done and wl.failed_vbuckets == []


def test_failed_server_leaves_every_list_and_unserved_vbuckets_are_failed():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, C)
    first = wl.next_round()
    wl.server_failed(A)
    for server, vbs in first.items():
        if server != A:
            wl.stream_succeeded(server, vbs)
    rest = wl.next_round()
    assert A not in rest
    for server, vbs in rest.items():
        wl.stream_succeeded(server, vbs)
    assert wl.next_round() == {}
    assert wl.done and wl.failed_vbuckets == []  # every vbucket had B as a replica


def test_vbuckets_with_every_source_failed_are_reported():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, C)
    wl.next_round()
    wl.server_failed(A)
    wl.server_failed(B)
    assert wl.done
    assert wl.failed_vbuckets == wl.vbuckets and wl.vbuckets


def test_node_keeping_its_vbuckets_pulls_nothing_on_scale_up():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, A)
    assert all(A not in view.current[vb] for vb in wl.sources)
