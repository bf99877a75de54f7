"""Moving records: a source (an old replica, over TAP or the LRU crawler) streamed through
the codec into the target (the local memcached) under the conflict rule."""
