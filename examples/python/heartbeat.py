"""A heartbeat handler for wsusage with psycopg 3.

Run against a database with `CREATE EXTENSION wsusage`:

    pip install 'psycopg[binary]'
    WSUSAGE_DSN='host=/tmp dbname=postgres user=app' WORKSPACE_IDS='9b2f…,0d41…' python heartbeat.py

It shows one prepared statement per heartbeat (psycopg sends a str parameter untyped, and the
server resolves it to uuid: the one-argument wsusage_mark is the only one), the same with
uuid.UUID values, and heartbeats batched into one wsusage_mark_many call.
"""

import os
import uuid

import psycopg


def heartbeat(conn: psycopg.Connection, workspace_id: str) -> None:
    # prepare=True: parsed and planned once per connection, then only executed.
    conn.execute("SELECT wsusage_mark(%s)", (workspace_id,), prepare=True)


def heartbeat_batch(conn: psycopg.Connection, workspace_ids: list[uuid.UUID]) -> None:
    conn.execute("SELECT wsusage_mark_many(%s)", (workspace_ids,), prepare=True)


def main() -> None:
    ids = [i for i in os.environ["WORKSPACE_IDS"].split(",") if i]
    half = len(ids) // 2
    # autocommit: a mark is not transactional anyway, and each heartbeat is its own statement.
    with psycopg.connect(os.environ["WSUSAGE_DSN"], autocommit=True) as conn:
        for workspace_id in ids[:half]:
            heartbeat(conn, workspace_id)
        rest = [uuid.UUID(i) for i in ids[half:]]
        for start in range(0, len(rest), 100):
            heartbeat_batch(conn, rest[start : start + 100])
    print(f"marked {len(ids)} workspaces")


if __name__ == "__main__":
    main()
