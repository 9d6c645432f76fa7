"""Infrastructure every stage shares: schema, shard files, layout names, errors, logs, Ray."""
