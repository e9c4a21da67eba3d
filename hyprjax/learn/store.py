"""The learning store: one SQLite database in WAL mode holding what a learned adapter was asked,
what it answered, what people said about the answers, and the adapter's versions.

Tables (one row per thing, JSON only where the shape is open):
- `interactions`: a served completion of a learned adapter: its id (the completion id the client
  got), the adapter and the version that answered, the request (`{"messages": [...]}` or
  `{"prompt": "..."}`) and the text of each choice.
- `feedback`: one row per `POST /v1/feedback`: a label, a score or a correction of one choice.
  `heldout` is decided when the row is written and never changes, so an item kept aside for
  judging versions is never trained on. It is decided per prompt (`prompt_key`, a hash of the
  request): every item about the same request text lands on the same side, so a held-out
  judgement is never about a prompt some round trained on. `round` is the version whose
  promoted round trained on it (NULL: not yet learned).
- `versions`: every version a round produced (`promoted`, `rejected`, `rolled_back`, or
  `initial` for v0), with its parent, directory and the round's numbers. A row exists only once
  the version's files are complete on disk: a version without a row does not exist.
- `adapters`: per learned adapter, the live version (the alias target), the stack of versions it
  replaced (what rollback returns to), the base-model digest, `trained_seq`, the highest
  feedback sequence number a finished round has seen (feedback after it counts toward the next
  automatic round), and `next_version`: numbers are handed out once, so a version a crash
  left unfinished never has its number reused by different weights.

WAL with synchronous=FULL: a committed row survives the process being killed at any moment, and
readers (the HTTP handlers) never wait for the trainer's writes. One connection guarded by a lock
serves every thread: the writes are tiny and the lock keeps them ordered.
"""

from __future__ import annotations

import hashlib
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
    request TEXT NOT NULL, responses TEXT NOT NULL, finish TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL REFERENCES interactions(id),
    adapter TEXT NOT NULL, choice INTEGER NOT NULL, kind TEXT NOT NULL, value TEXT NOT NULL,
    trainable INTEGER NOT NULL, prompt_key TEXT NOT NULL, heldout INTEGER NOT NULL, created REAL NOT NULL,
    round INTEGER);
CREATE INDEX IF NOT EXISTS feedback_adapter ON feedback(adapter, seq);
CREATE INDEX IF NOT EXISTS feedback_prompt ON feedback(adapter, prompt_key);
CREATE TABLE IF NOT EXISTS versions (
    adapter TEXT NOT NULL, version INTEGER NOT NULL, parent INTEGER, status TEXT NOT NULL,
    created REAL NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL, PRIMARY KEY (adapter, version));
CREATE TABLE IF NOT EXISTS adapters (
    adapter TEXT PRIMARY KEY, live INTEGER NOT NULL, history TEXT NOT NULL, base_digest TEXT NOT NULL,
    trained_seq INTEGER NOT NULL, next_version INTEGER NOT NULL);
"""
_COLUMNS = {"interactions": 7, "feedback": 11, "versions": 7, "adapters": 6}


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
    finish: str  # the choice's finish reason as served (stop | length)


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
            shapes = {t: len(self._db.execute(f"PRAGMA table_info({t})").fetchall()) for t in _COLUMNS}
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreError(f"--learn-db {self.path}: cannot open it as the learning database ({e})") from None
        if shapes != _COLUMNS:
            raise StoreError(f"--learn-db {self.path}: an SQLite database, but not a hyprjax learning database "
                             f"(tables {shapes})")
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
            cur.execute("INSERT INTO adapters VALUES (?, 0, '[]', ?, 0, 1)", (adapter, base_digest))
        self._tx(write)

    # ---------------------------------------------------------------------------- interactions
    def record(self, id: str, adapter: str, version: int, request: dict, responses: list[str],
               finish: list[str] | None = None) -> None:
        """Store one served completion; `finish` is each choice's finish reason (default "stop")."""
        finish = finish or ["stop"] * len(responses)
        self._tx(lambda cur: cur.execute("INSERT OR REPLACE INTO interactions VALUES (?, ?, ?, ?, ?, ?, ?)",
                                         (id, adapter, version, time.time(), json.dumps(request),
                                          json.dumps(responses), json.dumps(finish))))

    def interaction(self, id: str) -> dict | None:
        rows = self._query("SELECT adapter, version, request, responses, finish FROM interactions WHERE id=?", (id,))
        if not rows:
            return None
        adapter, version, request, responses, finish = rows[0]
        return {"adapter": adapter, "version": version, "request": json.loads(request),
                "responses": json.loads(responses), "finish": json.loads(finish)}

    def next_version(self, adapter: str) -> int:
        """A version number never handed out before for `adapter`."""
        def take(cur):
            (n,) = cur.execute("SELECT next_version FROM adapters WHERE adapter=?", (adapter,)).fetchone()
            cur.execute("UPDATE adapters SET next_version=? WHERE adapter=?", (n + 1, adapter))
            return n
        return self._tx(take)

    def add_feedback(self, id: str, choice: int, kind: str, value, heldout_every: int) -> tuple[int, bool]:
        """Store one feedback item; (its sequence number, whether it is held out).

        Held-out prompts: among the distinct prompts with trainable feedback (corrections and
        positive labels or scores), every `heldout_every`-th, counting from the third, so the
        first round already has one. Every item about a prompt that already has feedback takes
        that prompt's side. Negative items are never held out: nothing scores them.
        """
        def write(cur):
            adapter, request = cur.execute("SELECT adapter, request FROM interactions WHERE id=?", (id,)).fetchone()
            key = prompt_key(request)
            useful = trainable(kind, value)
            prior = cur.execute("SELECT heldout FROM feedback WHERE adapter=? AND prompt_key=? AND trainable=1 "
                                "LIMIT 1", (adapter, key)).fetchone()
            if not useful:
                heldout = False
            elif prior is not None:
                heldout = bool(prior[0])
            else:
                (n,) = cur.execute("SELECT COUNT(DISTINCT prompt_key) FROM feedback WHERE adapter=? AND trainable=1",
                                   (adapter,)).fetchone()
                heldout = n % heldout_every == min(2, heldout_every - 1)
            cur.execute("INSERT INTO feedback (id, adapter, choice, kind, value, trainable, prompt_key, heldout, "
                        "created, round) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                        (id, adapter, choice, kind, json.dumps(value), int(useful), key, int(heldout), time.time()))
            return cur.lastrowid, heldout
        return self._tx(write)

    def feedback(self, adapter: str) -> list[Feedback]:
        rows = self._query(
            "SELECT f.seq, f.id, f.adapter, f.choice, f.kind, f.value, f.heldout, f.round, i.request, i.responses, "
            "i.finish FROM feedback f JOIN interactions i ON i.id = f.id WHERE f.adapter=? ORDER BY f.seq", (adapter,))
        out = []
        for seq, id, ad, choice, kind, value, heldout, rnd, request, responses, finish in rows:
            texts, finish = json.loads(responses), json.loads(finish)
            out.append(Feedback(seq, id, ad, choice, kind, json.loads(value), bool(heldout), rnd,
                                json.loads(request), texts[choice], finish[choice]))
        return out

    def feedback_counts(self, adapter: str) -> dict:
        """total, by kind, heldout, learned (trained on by a promoted round), new (trainable, not
        held out, after the last round)."""
        state = self.adapter(adapter) or {"trained_seq": 0}
        kinds = dict(self._query("SELECT kind, COUNT(*) FROM feedback WHERE adapter=? GROUP BY kind", (adapter,)))
        (heldout, learned, new), = self._query(
            "SELECT COALESCE(SUM(heldout), 0), COUNT(round), COALESCE(SUM(seq > ? AND trainable AND NOT heldout), 0) "
            "FROM feedback WHERE adapter=?", (state["trained_seq"], adapter))
        return {"total": sum(kinds.values()), "by_kind": kinds, "heldout": heldout, "learned": learned, "new": new}

    # -------------------------------------------------------------------------------- versions
    def versions(self, adapter: str) -> list[Version]:
        rows = self._query("SELECT adapter, version, parent, status, created, path, metrics FROM versions "
                           "WHERE adapter=? ORDER BY version", (adapter,))
        return [Version(a, v, p, s, c, path, json.loads(m)) for a, v, p, s, c, path, m in rows]

    def finish_round(self, adapter: str, version: int, parent: int, path: str, metrics: dict, *, promote: bool,
                     trained_seqs: list[int], seen_seq: int) -> bool:
        """Commit a round: its version row, the alias if promoted, which feedback it learned.
        A promotion happens only if `parent` is still live when the transaction runs (a rollback
        meanwhile rejects it); returns whether it was promoted."""
        def write(cur):
            live, history = cur.execute("SELECT live, history FROM adapters WHERE adapter=?", (adapter,)).fetchone()
            nonlocal promote
            if promote and live != parent:
                promote = False
                metrics["reason"] = f"v{parent} stopped being live during the round (v{live} is)"
            cur.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (adapter, version, parent, "promoted" if promote else "rejected", time.time(), path,
                         json.dumps(metrics)))
            if promote:
                cur.execute("UPDATE adapters SET live=?, history=? WHERE adapter=?",
                            (version, json.dumps(json.loads(history) + [live]), adapter))
                cur.executemany("UPDATE feedback SET round=? WHERE seq=?", [(version, s) for s in trained_seqs])
            cur.execute("UPDATE adapters SET trained_seq=MAX(trained_seq, ?) WHERE adapter=?", (seen_seq, adapter))
            return promote
        return self._tx(write)

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


def prompt_key(request_json: str) -> str:
    """The held-out split's unit: a hash of the request as stored."""
    return hashlib.blake2b(request_json.encode(), digest_size=8).hexdigest()


def trainable(kind: str, value) -> bool:
    """Corrections and positive labels/scores are SFT targets; negative ones are recorded only."""
    if kind == "correction":
        return True
    if kind == "label":
        return bool(value)
    return float(value) >= 0.5
