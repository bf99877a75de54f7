"""The worklist: which vbuckets the local node pulls, and from whom: one pass per source."""
from astaire.cluster.view import ClusterView
from astaire.cluster.worklist import Worklist

A, B, C = "10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"


def test_stable_cluster_needs_nothing_without_full_resync():
    wl = Worklist(ClusterView([A, B]), A)
    assert wl.sources == {} and wl.needing == 0
    assert wl.streams() == {}


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


def test_one_pass_streams_each_old_replica_once_for_every_wanted_vbucket_it_holds():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, C)
    streams = wl.streams()
    assert set(streams) == {A, B}
    for server, vbs in streams.items():
        assert vbs == sorted(vb for vb in wl.sources if server in view.current[vb])
    assert sum(len(v) for v in streams.values()) == wl.needing
    assert wl.streams() == {}  # one pass only
    for server, vbs in streams.items():
        wl.stream_succeeded(server, vbs)
    assert wl.failed_vbuckets == []


def test_a_failed_source_leaves_its_vbuckets_served_by_the_other_replica():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, C)
    streams = wl.streams()
    wl.server_failed(A)
    wl.stream_succeeded(B, streams[B])
    assert wl.failed_servers == [A]
    assert wl.failed_vbuckets == []  # every vbucket had B as a replica


def test_vbuckets_with_every_source_failed_are_reported():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, C)
    wl.streams()
    wl.server_failed(A)
    wl.server_failed(B)
    assert wl.failed_vbuckets == wl.vbuckets and wl.vbuckets


def test_padded_resizing_lists_give_each_source_once():
    view = ClusterView([A], [A, C], replicas=2)  # the current ring has one node: lists padded [A, A]
    wl = Worklist(view, C)
    assert all(sources == [A] for sources in wl.sources.values()) and wl.sources
    assert wl.needing == len(wl.sources)


def test_node_keeping_its_vbuckets_pulls_nothing_on_scale_up():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, A)
    assert all(A not in view.current[vb] for vb in wl.sources)


def test_hold_gives_the_two_old_replicas_of_a_vbucket_opposite_halves():
    view = ClusterView([A, B], [A, B, C])
    wl = Worklist(view, C)
    streams = wl.streams()
    holds = {server: dict(wl.hold(server, vbs)) for server, vbs in streams.items()}
    for vb, sources in wl.sources.items():
        assert len(sources) == 2
        assert {holds[s][vb] for s in sources} == {0, 1}
        assert holds[sources[0]][vb] == 0
    one_source = Worklist(ClusterView([A, B, C]), A, full=True)  # a full resync: one other replica each
    for server, vbs in one_source.streams().items():
        assert one_source.hold(server, vbs) == []
