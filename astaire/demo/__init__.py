"""Demo and benchmark tooling, apart from the engine: a local cluster of memcached servers
on loopback, a MemcachedStore-layout workload, and ``astaire demo``."""
