"""Records on disk: the append-only record store, shards and provenance."""
