"""The state the daemon keeps: the database and its dialects, schema, leads, outbox,
quarantine, webhook events, journal, the instance lock, replicas, migration, the state folder."""
