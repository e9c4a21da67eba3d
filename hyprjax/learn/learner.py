"""The server's learning loop: record what learned adapters answer, take feedback, train the next
version in a background worker, promote it behind the adapter's alias only if it beats the live
version on held-out feedback, roll back on request.

Names. A learned adapter NAME is served as immutable versions `NAME@v0`, `NAME@v1`, ... (each a
separate adapter of the engine, so its prefix-cache entries are keyed by the version, never by
the name) and an alias NAME that points at the live version. `pin` resolves the alias when the
server admits a request: the request runs, and finishes, on that version whatever is promoted
meanwhile. Versions stay loaded (up to `keep`, then the oldest that are neither live nor a
rollback target are unloaded; their files stay), so a pinned request never loses its adapter.

Threads. HTTP handlers call `record`, `feedback`, `train`, `status` and `rollback` (quick: a few
SQLite statements). One worker thread runs the rounds, never the engine thread: it trains with
the round trainer's own copy of the base weights, writes the version (learn/versions.py),
registers it with the engine between steps (`load_adapter`, like the admin route), commits the
round to the store and only then flips the alias. A process killed at any point of that leaves
the store and the disk consistent: the alias and every committed version survive, feedback is
never lost, and a half-written version is swept at the next start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from ..adapters.lora import MODULES, LoraAdapter
from ..adapters.peft import read_peft
from ..adapters.registry import LoraRequest
from ..config import ModelConfig
from ..errors import HyprjaxError
from ..training.lora import from_adapter, init_lora, to_adapter
from .rounds import LearnOptions, RoundTrainer, example_object
from .store import Store, Version, trainable
from .versions import fault, lock_database, model_digest, sweep, versions_root, write_version

log = logging.getLogger("hyprjax.learn")
_VERSIONED = re.compile(r"^(?P<name>.+)@v(?P<version>\d+)$")


class LearnError(HyprjaxError):
    """A learning request that cannot be served: `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One training round, queued or run."""

    id: str
    adapter: str
    state: str = "queued"  # queued | running | done | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0
    outcome: str | None = None  # promoted | rejected | skipped | failed
    version: str | None = None
    reason: str | None = None

    def view(self) -> dict:
        return dataclasses.asdict(self)


class Learner:
    """Learning for the adapters named by `--learn`, over one store and one worker."""

    def __init__(self, db_path: str | Path, names: list[str], model_path: str, cfg: ModelConfig, *,
                 initial: dict[str, LoraAdapter] | None = None, options: LearnOptions = LearnOptions(),
                 learn_every: int = 16, keep: int = 16):
        if learn_every < 1 or keep < 2:
            raise LearnError("--learn-every must be >= 1 and keep >= 2")
        bad = [n for n in names if not _NAME.match(n)]
        if bad:
            raise LearnError(f"--learn {bad[0]!r}: a learned adapter's name is letters, digits, '.', '_' and '-' "
                             "(its versions are NAME@vN)")
        self.store = Store(db_path)
        self._lockfile = lock_database(Path(db_path))
        self.root = versions_root(Path(db_path))
        self.names, self.cfg, self.options = list(dict.fromkeys(names)), cfg, options
        self.learn_every, self.keep = learn_every, keep
        self.digest = model_digest(model_path, cfg)
        self.trainer = RoundTrainer(model_path, options)
        self.front = None  # the engine front (AsyncEngine / Replicas), from `attach`
        self._live: dict[str, int] = {}
        self._loaded: dict[str, list[int]] = {}  # versions registered with the engine, oldest first
        self._jobs: dict[str, Job] = {}
        self._current: dict[str, Job] = {}  # adapter -> its queued or running round
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # jobs and the current round per adapter
        self._alias_lock = threading.RLock()  # commits, rollbacks, _live and _loaded
        self._stopping = threading.Event()
        self._failed: dict[str, int] = {}
        self._last_job: dict[str, Job] = {}  # adapter -> its last finished round (this process)
        self._thread: threading.Thread | None = None
        for name in self.names:
            self._prepare(name, (initial or {}).get(name))

    # ------------------------------------------------------------------------------ start-up
    def _prepare(self, name: str, initial: LoraAdapter | None) -> None:
        state = self.store.adapter(name)
        if state is not None and initial is not None:
            log.warning("--lora %s=%s is not used: the learning database %s already holds %s's versions "
                        "(live: v%d)", name, initial.path, self.store.path, name, state["live"])
        if state is None:
            adapter = initial if initial is not None else self._fresh(name)
            if adapter.sparse:
                raise LearnError(f"--learn {name}: learning continues LoRA adapters; {name} is {adapter.kind}")
            from_adapter(adapter, self.cfg)  # one rank and scale over every layer, or a clear error now
            sweep(self.root, name, set())
            meta = self._meta(adapter, parent=None, metrics={"source": adapter.path or "fresh"})
            path = write_version(self.root, adapter, name, 0, self.cfg, meta)
            self.store.create_adapter(name, self.digest, str(path), meta)
            log.info("learning %s from %s: v0 written to %s", name, adapter.path or "a fresh LoRA", path)
            state = self.store.adapter(name)
        elif state["base_digest"] != self.digest:
            raise LearnError(f"--learn {name}: the learning database {self.store.path} holds versions of {name} "
                             f"trained over another base model (digest {state['base_digest']}, this model's is "
                             f"{self.digest}); use another --learn-db or adapter name")
        removed = sweep(self.root, name, {v.version for v in self.store.versions(name)})
        for path in removed:
            log.warning("removed %s: a version a killed process never finished", path)
        self._live[name] = state["live"]

    def _fresh(self, name: str) -> LoraAdapter:
        """PEFT's initialisation (B = 0): v0 answers exactly as the base model does."""
        o = self.options
        params = init_lora(self.cfg, o.rank, MODULES, jax.random.key(o.seed))
        return to_adapter(jax.device_get(params), o.alpha / o.rank, name)

    def _meta(self, adapter: LoraAdapter, parent: int | None, metrics: dict) -> dict:
        m = next(iter(adapter.modules.values()))
        return {"parent": parent, "base_digest": self.digest, "rank": m.rank, "alpha": m.scale * m.rank,
                "created": time.time(), "metrics": metrics}

    def startup_adapters(self) -> list[tuple[str, str]]:
        """(engine name, PEFT directory) of each version to register before serving."""
        out = []
        for name in self.names:
            versions = self._servable(name, self.store.versions(name))
            self._loaded[name] = [v.version for v in versions]
            out += [(v.name, str(Path(v.path) / "adapter")) for v in versions]
        return out

    def _servable(self, name: str, versions: list[Version]) -> list[Version]:
        """The newest `keep` versions, always with the live one and what rollback returns to."""
        state = self.store.adapter(name)
        must = {state["live"], *state["history"][-2:]}
        keep = {v.version for v in versions[-self.keep:]} | must
        return [v for v in versions if v.version in keep]

    def attach(self, front) -> None:
        """Serve through `front` (its engine holds the startup versions); start the worker."""
        self.front = front
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="hyprjax-learn", daemon=True)
            self._thread.start()
        for name in self.names:
            self._maybe_start(name)

    # -------------------------------------------------------------------------------- serving
    def aliases(self) -> dict[str, str]:
        """Alias -> the live version's engine name."""
        return {name: f"{name}@v{v}" for name, v in self._live.items()}

    def version_of(self, engine_name: str) -> tuple[str, int] | None:
        """(adapter, version) for an engine name `NAME@vN` of a learned adapter, else None."""
        m = _VERSIONED.match(engine_name)
        if m and m.group("name") in self._live:
            return m.group("name"), int(m.group("version"))
        return None

    def pin(self, lora: LoraRequest | None) -> tuple[LoraRequest | None, tuple[str, int] | None]:
        """Resolve aliases to the live versions now; (the pinned request, the (adapter, version) to
        record under when the request is one learned adapter alone, else None)."""
        if lora is None:
            return None, None
        live = self.aliases()
        pinned = dataclasses.replace(lora, adapters=tuple(live.get(a, a) for a in lora.adapters))
        if len(pinned.adapters) != 1 or pinned.weights != (1.0,):
            return pinned, None
        return pinned, self.version_of(pinned.adapters[0])

    def record(self, completion_id: str, adapter: str, version: int, request: dict, responses: list[str],
               finish: list[str] | None = None) -> None:
        self.store.record(completion_id, adapter, version, request, responses, finish)

    # ------------------------------------------------------------------------------- feedback
    def feedback(self, body) -> dict:
        """Store one `POST /v1/feedback` body; LearnError(404) for an unknown id, (400) if malformed."""
        if not isinstance(body, dict):
            raise LearnError("the feedback body must be a JSON object")
        cid = body.get("id")
        if not isinstance(cid, str) or not cid:
            raise LearnError("'id' is required: the id of a completion this server returned")
        kinds = [k for k in ("label", "score", "correction") if k in body]
        if len(kinds) != 1:
            raise LearnError(f"give exactly one of 'label', 'score' or 'correction' (got {kinds or 'none'})")
        kind, value = kinds[0], body[kinds[0]]
        if kind == "label" and not isinstance(value, bool):
            raise LearnError("'label' must be true or false")
        if kind == "score" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not math.isfinite(value) or not 0 <= value <= 1):
            raise LearnError("'score' must be a number from 0 (bad) to 1 (good)")
        if kind == "correction" and (not isinstance(value, str) or not value.strip()):
            raise LearnError("'correction' must be a non-empty string: the answer that should have been given")
        choice = body.get("choice", 0)
        interaction = self.store.interaction(cid)
        if interaction is None:
            raise LearnError(f"no completion {cid!r} of a learning adapter is recorded here", 404)
        if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(interaction["responses"]):
            raise LearnError(f"'choice' must be the index of one of the completion's "
                             f"{len(interaction['responses'])} choices")
        name = interaction["adapter"]
        if name not in self._live:
            raise LearnError(f"completion {cid!r} was answered by {name}, which this server does not learn now "
                             f"(start it with --learn {name})", 409)
        seq, heldout = self.store.add_feedback(cid, choice, kind, value, self.options.heldout_every)
        job = self._maybe_start(name)
        return {"object": "feedback", "id": cid, "adapter": name, "version": f"{name}@v{interaction['version']}",
                "kind": kind, "heldout": heldout, "trained": trainable(kind, value) and not heldout,
                "pending": self.store.feedback_counts(name)["new"], "round": job.id if job else None}

    # --------------------------------------------------------------------------------- rounds
    def _check(self, name: str) -> None:
        if name not in self._live:
            raise LearnError(f"adapter {name!r} is not learning (start the server with --learn {name})", 404)

    def _maybe_start(self, name: str) -> Job | None:
        """Queue a round when `learn_every` new trainable items have arrived since the last one."""
        counts = self.store.feedback_counts(name)
        if counts["new"] >= self.learn_every and counts["heldout"] and self.front is not None:
            return self._queue_round(name)
        return None

    def train(self, name: str) -> tuple[Job, bool]:
        """`POST /v1/adapters/NAME/train`: (the round, whether it was queued by this call)."""
        self._check(name)
        with self._lock:
            if name in self._current:
                return self._current[name], False
        pending = [f for f in self.store.feedback(name) if f.round is None and not f.heldout
                   and trainable(f.kind, f.value)]
        if not pending:
            raise LearnError(f"{name}: no new feedback to learn from (corrections or positive labels)", 409)
        if not self.store.feedback_counts(name)["heldout"]:
            raise LearnError(f"{name}: no held-out feedback yet to judge a new version by; one trainable item in "
                             f"{self.options.heldout_every} is kept aside, starting with the third", 409)
        return self._queue_round(name), True

    def _queue_round(self, name: str) -> Job:
        with self._lock:
            if name in self._current:
                return self._current[name]
            job = Job(f"learn-{uuid.uuid4().hex[:12]}", name)
            self._jobs[job.id] = self._current[name] = job
            for old in list(self._jobs)[:-64]:  # the latest rounds only
                del self._jobs[old]
        self._queue.put(job)
        log.info("%s: round %s queued", name, job.id)
        return job

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.state, job.started = "running", time.time()
            try:
                self._round(job)
                job.state = "done"
            except _Stopped:
                job.state, job.outcome, job.reason = "failed", "failed", "the server shut down during the round"
            except Exception as e:  # a failed round changes nothing; the server goes on serving
                log.exception("%s: round %s failed", job.adapter, job.id)
                job.state, job.outcome, job.reason = "failed", "failed", f"{type(e).__name__}: {e}"
                self._failed[job.adapter] = self._failed.get(job.adapter, 0) + 1
            finally:
                job.finished = time.time()
                with self._lock:
                    self._current.pop(job.adapter, None)
                    self._last_job[job.adapter] = job
            if job.outcome != "failed" and not self._stopping.is_set():
                self._maybe_start(job.adapter)

    def _round(self, job: Job) -> None:
        name, opts, t0 = job.adapter, self.options, time.perf_counter()
        self.trainer.load()
        state = self.store.adapter(name)
        parent = state["live"]
        items = self.store.feedback(name)
        seen = max((f.seq for f in items), default=0)
        lineage = set(state["history"]) | {parent}
        usable = [f for f in items if trainable(f.kind, f.value) and (f.kind == "correction" or f.finish != "length")]
        new = [f for f in usable if f.round is None and not f.heldout]
        pool = [f for f in usable if f.round in lineage and not f.heldout]
        heldout = [f for f in usable if f.heldout]
        if not new or not heldout:
            job.outcome = "skipped"
            job.reason = "no new trainable feedback" if not new else "no held-out feedback to judge by"
            return
        rng = np.random.default_rng([opts.seed, parent, seen])
        k = min(len(pool), round(opts.replay * len(new)))
        replay = [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False))] if k else []
        fresh, skipped = self.trainer.examples([_line(f) for f in new])
        replayed, skipped_replay = self.trainer.examples([_line(f) for f in replay])
        train, skipped = fresh + replayed, skipped + skipped_replay
        held, skipped_held = self.trainer.examples([_line(f) for f in heldout])
        if not train or not held:
            job.outcome, job.reason = "skipped", "; ".join(skipped + skipped_held) or "no usable examples"
            return
        parent_adapter = read_peft(Path(self._version(name, parent).path) / "adapter", f"{name}@v{parent}", self.cfg)
        params, scale = from_adapter(parent_adapter, self.trainer.cfg)
        parent_loss, parent_acc = self.trainer.score(params, scale, held)
        log.info("%s: round %s: %d new items, %d replayed, %d held out (v%d held-out loss %.4f)", name, job.id,
                 len(new), len(replay), len(heldout), parent, parent_loss)

        def on_step(step, steps, loss):
            if self._stopping.is_set():
                raise _Stopped
            job.step, job.steps = step, steps
            if step == 1 or step % 10 == 0 or step == steps:
                log.info("%s: round %s: step %d/%d loss %.4f", name, job.id, step, steps, loss)

        new_params, metrics = self.trainer.fit(params, scale, train, on_step, stop=fresh)
        loss, acc = self.trainer.score(new_params, scale, held)
        promote = loss < parent_loss
        metrics = {**metrics, "heldout_loss": loss, "parent_heldout_loss": parent_loss, "heldout_accuracy": acc,
                   "parent_heldout_accuracy": parent_acc, "num_new": len(new), "num_replay": len(replay),
                   "num_heldout": len(heldout), "skipped_items": skipped + skipped_held,
                   "reason": "held-out loss improved" if promote else "held-out loss did not improve", "job": job.id}
        version = self.store.next_version(name)  # never reused, even if this process dies below
        adapter = to_adapter(jax.device_get(new_params), scale, f"{name}@v{version}")
        path = write_version(self.root, adapter, name, version, self.cfg, self._meta(adapter, parent, metrics))
        self._register(name, version, path)
        fault("before-commit")
        metrics["seconds"] = round(time.perf_counter() - t0, 3)
        with self._alias_lock:
            promote = self.store.finish_round(name, version, parent, str(path), metrics, promote=promote,
                                              trained_seqs=[f.seq for f in new], seen_seq=seen)
            if promote:
                self._live[name] = version
        job.outcome, job.version, job.reason = "promoted" if promote else "rejected", f"{name}@v{version}", \
            metrics["reason"]
        log.info("%s: v%d %s (%s): held-out loss %.4f vs v%d's %.4f, %d steps in %.1f s", name, version,
                 job.outcome, metrics["reason"], loss, parent, parent_loss, metrics["steps"], metrics["seconds"])
        self._unload_old(name)

    def _version(self, name: str, version: int) -> Version:
        return next(v for v in self.store.versions(name) if v.version == version)

    def _register(self, name: str, version: int, path: Path) -> None:
        """Make `NAME@vN` servable (between engine steps) before anything points at it."""
        if self.front is not None:
            asyncio.run(self.front.load_adapter(f"{name}@v{version}", str(path / "adapter")))
        with self._alias_lock:
            self._loaded.setdefault(name, []).append(version)

    def _unload_old(self, name: str) -> None:
        keep = {v.version for v in self._servable(name, self.store.versions(name))}
        for version in [v for v in self._loaded.get(name, []) if v not in keep]:
            try:
                asyncio.run(self.front.unload_adapter(f"{name}@v{version}"))  # waits for requests on it
            except Exception as e:  # its files stay; a later start will not load it
                log.warning("%s@v%d: not unloaded: %s", name, version, e)
            with self._alias_lock:
                self._loaded[name].remove(version)

    # ----------------------------------------------------------------------------- inspection
    def rollback(self, name: str) -> dict:
        """`POST /v1/adapters/NAME/rollback`: the alias goes back to the version the live one replaced."""
        self._check(name)
        with self._alias_lock:
            state = self.store.adapter(name)
            if not state["history"]:
                raise LearnError(f"{name}@v{state['live']} is the first version: there is nothing to roll back to", 409)
            target = state["history"][-1]
            if target not in self._loaded.get(name, []):  # unloaded as old: bring it back before pointing at it
                self._register(name, target, Path(self._version(name, target).path))
            old, new = self.store.rollback(name)
            self._live[name] = new
        log.info("%s: rolled back from v%d to v%d", name, old, new)
        return {"object": "adapter.rollback", "adapter": name, "live": f"{name}@v{new}",
                "rolled_back": f"{name}@v{old}"}

    def status(self, name: str) -> dict:
        """`GET /v1/adapters/NAME`."""
        self._check(name)
        state = self.store.adapter(name)
        versions = self.store.versions(name)
        loaded = set(self._loaded.get(name, []))
        with self._lock:
            current = self._current.get(name)
        last = next((v for v in reversed(versions) if v.version > 0), None)
        return {"object": "adapter", "id": name, "learning": True, "live": f"{name}@v{state['live']}",
                "rollback_to": f"{name}@v{state['history'][-1]}" if state["history"] else None,
                "versions": [{"id": v.name, "version": v.version, "parent": v.parent, "status": v.status,
                              "live": v.version == state["live"], "loaded": v.version in loaded,
                              "created": int(v.created), **{k: v.metrics.get(k) for k in _VERSION_FIELDS}}
                             for v in versions],
                "training": current.view() if current else {"state": "idle"},
                "last_job": self._last_job[name].view() if name in self._last_job else None,
                "feedback": self.store.feedback_counts(name), "learn_every": self.learn_every,
                "last_round": None if last is None else {"version": last.name, "status": last.status, **last.metrics}}

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def metrics(self) -> dict:
        """For /metrics: feedback by kind, rounds by outcome, the last round's losses, live versions."""
        out = {}
        for name in self.names:
            counts = self.store.feedback_counts(name)
            rounds: dict[str, int] = {}
            for v in self.store.versions(name):
                if v.version > 0:
                    outcome = "promoted" if v.status in ("promoted", "rolled_back") else v.status
                    rounds[outcome] = rounds.get(outcome, 0) + 1
            if self._failed.get(name):
                rounds["failed"] = self._failed[name]
            last = next((v.metrics for v in reversed(self.store.versions(name)) if v.version > 0), {})
            out[name] = {"feedback": counts["by_kind"], "rounds": rounds, "train_loss": last.get("train_loss"),
                         "heldout_loss": last.get("heldout_loss"), "live": self._live[name]}
        return out

    def shutdown(self) -> None:
        """Stop the worker (a running round is abandoned at its next step: nothing of it is
        committed), then close the store."""
        self._stopping.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(60)
        self.store.close()


class _Stopped(Exception):
    """The server is shutting down: abandon the round."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


_VERSION_FIELDS = ("steps", "train_loss", "heldout_loss", "parent_heldout_loss", "heldout_accuracy",
                   "parent_heldout_accuracy", "num_new", "num_replay", "num_heldout", "seconds", "reason", "source")


def _line(f) -> dict:
    return example_object(f.request, f.value if f.kind == "correction" else f.response)
