"""The cluster view and key hash reproduce Project Clearwater's C++ output exactly."""
import json
import pathlib

import pytest

from astaire.cluster.view import ClusterView, key_hash, vbucket_for_key

# Reference vectors computed with the original C++ code, copied into tests/data (see its README);
# test_vector_copies_match_the_shared_originals checks the copies when the originals are beside the checkout.
DATA = pathlib.Path(__file__).resolve().parent / "data"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors"
VECTOR_FILES = ("hashes.jsonl", "views.jsonl", "views-padding.jsonl")


def _lines(name):
    path = DATA / name
    if not path.exists():
        pytest.fail(f"reference vectors missing: {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", VECTOR_FILES)
def test_vector_copies_match_the_shared_originals(name):
    original = SHARED / name
    if not original.exists():
        pytest.skip(f"no shared original beside this checkout ({original})")
    assert (DATA / name).read_bytes() == original.read_bytes()


def test_hash_matches_reference_vectors():
    rows = _lines("hashes.jsonl")
    assert rows
    for row in rows:
        key = bytes.fromhex(row["key_hex"])
        assert key_hash(key) == row["hash"], row
        assert vbucket_for_key(key) == row["vbucket"], row


def _assert_view_matches(row):
    view = ClusterView(row["servers"], row["new_servers"], row["vbuckets"], row["replicas"])
    assert view.current == row["current"]
    assert view.new == row["new"]
    assert view.read == row["read"]
    assert view.write == row["write"]


@pytest.mark.parametrize("index", range(8))
def test_view_matches_reference_vectors(index):
    _assert_view_matches(_lines("views.jsonl")[index])


def test_view_vectors_are_all_covered():
    assert len(_lines("views.jsonl")) == 8  # one parametrised case per line above
    assert len(_lines("views-padding.jsonl")) == 2


@pytest.mark.parametrize("index", range(2))
def test_resizing_views_pad_short_lists_with_the_owner_as_the_original_does(index):
    row = _lines("views-padding.jsonl")[index]
    _assert_view_matches(row)
    assert any(len(set(r)) < len(r) for r in (row["current"] + row["new"]))  # the padding is exercised


def test_stable_view_every_vbucket_has_distinct_replicas():
    view = ClusterView(["a:1", "b:1", "c:1"])
    assert view.new is None
    for replicas in view.current:
        assert len(replicas) == 2 and len(set(replicas)) == 2


def test_single_server_lists_the_server_once():
    view = ClusterView(["a:1"])
    assert all(r == ["a:1"] for r in view.current)


def test_new_servers_only_is_a_stable_view_over_them():
    assert ClusterView([], ["a:1", "b:1"]).current == ClusterView(["a:1", "b:1"]).current
    assert ClusterView([], ["a:1", "b:1"]).new is None


def test_resizing_read_list_is_primary_then_new_then_rest_without_repeats():
    view = ClusterView(["a:1", "b:1"], ["a:1", "b:1", "c:1"])
    for vb in range(128):
        read = view.read[vb]
        assert read[0] == view.current[vb][0]
        assert len(read) == len(set(read))
        assert set(read) == set(view.current[vb]) | set(view.new[vb])


@pytest.mark.parametrize("vbuckets", [0, 3, 100])
def test_vbuckets_must_be_power_of_two(vbuckets):
    with pytest.raises(ValueError, match="power of two"):
        ClusterView(["a:1"], vbuckets=vbuckets)


def test_views_compare_by_replica_lists():
    assert ClusterView(["a:1", "b:1"]) == ClusterView(["a:1", "b:1"])
    assert ClusterView(["a:1", "b:1"]) != ClusterView(["a:1", "b:1"], ["a:1", "b:1", "c:1"])
