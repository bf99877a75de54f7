"""Demo and benchmark tooling, apart from the engine: a local cluster of memcached servers
on loopback, a MemcachedStore-layout workload, and ``astaire demo``."""


# ``register`` lives here, not in ``run``, so that building the command line (every start of the
# daemon included) does not import the demo's cluster tooling.
def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="resize a local 2-node memcached cluster to 3 nodes and resynchronise it",
        description="Start three memcached servers on loopback, load records the way "
        "MemcachedStore writes them onto the first two, resize 2 -> 3, run Astaire for the new "
        "node, wait for sync and print a report: records moved, seconds, records/s, MB/s, and "
        "a check that every record is where the view says.",
    )
    p.add_argument("--records", type=int, default=200_000, help="records to load (default %(default)s)")
    p.add_argument("--value-size", type=int, default=100, help="value bytes per record (default %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="Astaire workers (default: one per CPU)")
    p.add_argument("--source", choices=("auto", "tap", "crawler"), default="auto",
                   help="how Astaire reads the old replicas (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--keep-dir", action="store_true", help="keep the working directory (logs) afterwards")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from astaire.demo.run import run

    return run(args)
