"""The learning store: one SQLite database in WAL mode holding what a learned adapter was asked,
what it answered, what people said about the answers, and the adapter's versions.

Tables (one row per thing, JSON only where the shape is open):
- `interactions`: a served completion of a learned adapter: its id (the completion id the client
  got), the adapter and the version that answered, the request (`{"messages": [...]}` or
  `{"prompt": "..."}`) and the text of each choice.
- `feedback`: one row per `POST /v1/feedback`: a label, a score or a correction of one choice.
  `heldout` is decided when the row is written and never changes, so an item kept aside for
  judging versions is never trained on; `round` is the version whose promoted round trained on it
  (NULL: not yet learned).
- `versions`: every version a round produced (`promoted`, `rejected`, `rolled_back`, or
  `initial` for v0), with its parent, directory and the round's numbers. A row exists only once
  the version's files are complete on disk: a version without a row does not exist.
- `adapters`: per learned adapter, the live version (the alias target), the stack of versions it
  replaced (what rollback returns to), the base-model digest, and `trained_seq`, the highest
  feedback sequence number a finished round has seen (feedback after it counts toward the next
  automatic round).

WAL with synchronous=FULL: a committed row survives the process being killed at any moment, and
readers (the HTTP handlers) never wait for the trainer's writes. One connection guarded by a lock
serves every thread: the writes are tiny and the lock keeps them ordered.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HyprjaxError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    id TEXT PRIMARY KEY, adapter TEXT NOT NULL, version INTEGER NOT NULL, created REAL NOT NULL,
    request TEXT NOT NULL, responses TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL REFERENCES interactions(id),
    adapter TEXT NOT NULL, choice INTEGER NOT NULL, kind TEXT NOT NULL, value TEXT NOT NULL,
    heldout INTEGER NOT NULL, created REAL NOT NULL, round INTEGER);
CREATE INDEX IF NOT EXISTS feedback_adapter ON feedback(adapter, seq);
CREATE TABLE IF NOT EXISTS versions (
    adapter TEXT NOT NULL, version INTEGER NOT NULL, parent INTEGER, status TEXT NOT NULL,
    created REAL NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL, PRIMARY KEY (adapter, version));
CREATE TABLE IF NOT EXISTS adapters (
    adapter TEXT PRIMARY KEY, live INTEGER NOT NULL, history TEXT NOT NULL, base_digest TEXT NOT NULL,
    trained_seq INTEGER NOT NULL);
"""


class StoreError(HyprjaxError):
    """The learning database cannot be opened or is not ours."""


@dataclass(frozen=True)
class Feedback:
    seq: int
    id: str
    adapter: str
    choice: int
    kind: str  # label | score | correction
    value: object  # bool | float | str
    heldout: bool
    round: int | None
    request: dict  # the interaction's request
    response: str  # the choice's text as served


@dataclass(frozen=True)
class Version:
    adapter: str
    version: int
    parent: int | None
    status: str  # initial | promoted | rejected | rolled_back
    created: float
    path: str
    metrics: dict

    @property
    def name(self) -> str:
        return f"{self.adapter}@v{self.version}"


class Store:
    """The database behind `--learn-db`; safe to use from any thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreError(f"--learn-db {self.path}: cannot open it as the learning database ({e})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn):
        """Run fn(cursor) in one transaction: all of it is committed, or none of it."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                result = fn(cur)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
            return result

    def _query(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------------------ adapters
    def adapter(self, adapter: str) -> dict | None:
        rows = self._query("SELECT live, history, base_digest, trained_seq FROM adapters WHERE adapter=?", (adapter,))
        if not rows:
            return None
        live, history, digest, trained = rows[0]
        return {"live": live, "history": json.loads(history), "base_digest": digest, "trained_seq": trained}

    def create_adapter(self, adapter: str, base_digest: str, path: str, metrics: dict) -> None:
        """Record v0 (the adapter learning starts from) and make it live."""
        def write(cur):
            cur.execute("INSERT INTO versions VALUES (?, 0, NULL, 'initial', ?, ?, ?)",
                        (adapter, time.time(), path, json.dumps(metrics)))
            cur.execute("INSERT INTO adapters VALUES (?, 0, '[]', ?, 0)", (adapter, base_digest))
        self._tx(write)

    # ---------------------------------------------------------------------------- interactions
    def record(self, id: str, adapter: str, version: int, request: dict, responses: list[str]) -> None:
        self._tx(lambda cur: cur.execute("INSERT OR REPLACE INTO interactions VALUES (?, ?, ?, ?, ?, ?)",
                                         (id, adapter, version, time.time(), json.dumps(request),
                                          json.dumps(responses))))

    def interaction(self, id: str) -> dict | None:
        rows = self._query("SELECT adapter, version, request, responses FROM interactions WHERE id=?", (id,))
        if not rows:
            return None
        adapter, version, request, responses = rows[0]
        return {"adapter": adapter, "version": version, "request": json.loads(request),
                "responses": json.loads(responses)}

    def add_feedback(self, id: str, choice: int, kind: str, value, heldout_every: int) -> tuple[int, bool]:
        """Store one feedback item; (its sequence number, whether it is held out).

        Held-out items: every `heldout_every`-th trainable item of an adapter (corrections and
        positive labels or scores), counting from the third, so the first round already has one;
        every item about an interaction already held out stays held out (no answer is both trained
        on and judged on). Negative items are never held out: they are not scored.
        """
        def write(cur):
            (adapter,) = cur.execute("SELECT adapter FROM interactions WHERE id=?", (id,)).fetchone()
            trainable = _trainable(kind, value)
            if not trainable:
                heldout = False
            elif cur.execute("SELECT 1 FROM feedback WHERE id=? AND heldout=1", (id,)).fetchone():
                heldout = True
            else:
                n = sum(_trainable(k, json.loads(v)) for k, v in cur.execute(
                    "SELECT kind, value FROM feedback WHERE adapter=?", (adapter,)))
                heldout = heldout_every > 0 and n % heldout_every == min(2, heldout_every - 1)
            cur.execute("INSERT INTO feedback (id, adapter, choice, kind, value, heldout, created, round) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                        (id, adapter, choice, kind, json.dumps(value), int(heldout), time.time()))
            return cur.lastrowid, heldout
        return self._tx(write)

    def feedback(self, adapter: str) -> list[Feedback]:
        rows = self._query(
            "SELECT f.seq, f.id, f.adapter, f.choice, f.kind, f.value, f.heldout, f.round, i.request, i.responses "
            "FROM feedback f JOIN interactions i ON i.id = f.id WHERE f.adapter=? ORDER BY f.seq", (adapter,))
        out = []
        for seq, id, ad, choice, kind, value, heldout, rnd, request, responses in rows:
            texts = json.loads(responses)
            out.append(Feedback(seq, id, ad, choice, kind, json.loads(value), bool(heldout), rnd,
                                json.loads(request), texts[choice] if choice < len(texts) else ""))
        return out

    def feedback_counts(self, adapter: str) -> dict:
        """total, by kind, heldout, learned (trained on by a promoted round), new (after the last round)."""
        state = self.adapter(adapter) or {"trained_seq": 0}
        rows = self._query("SELECT kind, value, heldout, round, seq FROM feedback WHERE adapter=?", (adapter,))
        kinds: dict[str, int] = {}
        for kind, *_ in rows:
            kinds[kind] = kinds.get(kind, 0) + 1
        return {"total": len(rows), "by_kind": kinds, "heldout": sum(r[2] for r in rows),
                "learned": sum(r[3] is not None for r in rows),
                "new": sum(r[4] > state["trained_seq"] and not r[2] and _trainable(r[0], json.loads(r[1]))
                           for r in rows)}

    # -------------------------------------------------------------------------------- versions
    def versions(self, adapter: str) -> list[Version]:
        rows = self._query("SELECT adapter, version, parent, status, created, path, metrics FROM versions "
                           "WHERE adapter=? ORDER BY version", (adapter,))
        return [Version(a, v, p, s, c, path, json.loads(m)) for a, v, p, s, c, path, m in rows]

    def finish_round(self, adapter: str, version: int, parent: int, path: str, metrics: dict, *, promote: bool,
                     trained_seqs: list[int], seen_seq: int) -> None:
        """Commit a round: its version row, the alias if promoted, which feedback it learned."""
        def write(cur):
            cur.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (adapter, version, parent, "promoted" if promote else "rejected", time.time(), path,
                         json.dumps(metrics)))
            live, history = cur.execute("SELECT live, history FROM adapters WHERE adapter=?", (adapter,)).fetchone()
            if promote:
                cur.execute("UPDATE adapters SET live=?, history=? WHERE adapter=?",
                            (version, json.dumps(json.loads(history) + [live]), adapter))
                cur.executemany("UPDATE feedback SET round=? WHERE seq=?", [(version, s) for s in trained_seqs])
            cur.execute("UPDATE adapters SET trained_seq=MAX(trained_seq, ?) WHERE adapter=?", (seen_seq, adapter))
        self._tx(write)

    def rollback(self, adapter: str) -> tuple[int, int]:
        """Make the version the live one replaced live again; (from, to). The rolled-back version
        is marked `rolled_back`; the feedback its round learned stays marked with it, so later rounds
        neither learn it again nor replay it (it is off the live lineage): send it again to re-teach."""
        def write(cur):
            live, history = cur.execute("SELECT live, history FROM adapters WHERE adapter=?", (adapter,)).fetchone()
            history = json.loads(history)
            if not history:
                raise HyprjaxError(f"{adapter}@v{live} is the first version: there is nothing to roll back to")
            previous = history.pop()
            cur.execute("UPDATE adapters SET live=?, history=? WHERE adapter=?", (previous, json.dumps(history), adapter))
            cur.execute("UPDATE versions SET status='rolled_back' WHERE adapter=? AND version=?", (adapter, live))
            return live, previous
        return self._tx(write)


def _trainable(kind: str, value) -> bool:
    """Corrections and positive labels/scores are SFT targets; negative ones are recorded only."""
    if kind == "correction":
        return True
    if kind == "label":
        return bool(value)
    return float(value) >= 0.5
