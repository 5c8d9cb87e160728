"""Subprocess for test_stream_crash: a minimal "caller" that ingests with a small budget and
commits (trained docs + new cursor) in ONE transaction, like a version commit."""
from __future__ import annotations

import json
import sys
import time

from sqlalchemy import Column, Integer, MetaData, Table, Text, create_engine, insert, select

from streams import EOS_ID, ByteTokenizer, StreamRegistry

meta = MetaData()
versions = Table("fake_versions", meta, Column("id", Integer, primary_key=True),
                 Column("cursor", Text))
trained = Table("fake_trained", meta, Column("id", Integer, primary_key=True),
                Column("doc", Text))


def split_docs(tokens):
    tok, out, start = ByteTokenizer(), [], 0
    for i in (tokens == EOS_ID).nonzero()[0]:
        out.append(tok.decode(tokens[start:i]))
        start = i + 1
    return out


def main(db: str, budget: int, pause: float) -> None:
    engine = create_engine(f"sqlite:///{db}")
    meta.create_all(engine)
    reg = StreamRegistry(engine)
    while True:
        with engine.connect() as c:
            row = c.execute(select(versions.c.cursor).order_by(versions.c.id.desc())).first()
        cursor = json.loads(row[0]) if row else None
        res = reg.ingest("s", cursor, token_budget=budget, stage=True)
        time.sleep(pause)  # "training"
        with engine.begin() as c:  # the commit: data and cursor together
            docs = split_docs(res.train_tokens)
            if docs:
                c.execute(insert(trained), [{"doc": d} for d in docs])
            c.execute(insert(versions), [{"cursor": json.dumps(res.new_cursor)}])
        if res.exhausted:
            print("DONE", flush=True)
            return


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
