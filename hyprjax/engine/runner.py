"""ModelRunner: packs a scheduled step into fixed-shape arrays and runs the jitted paged step
(engine/step.py: one fused program per bucket on GPU/TPU, embed + per-layer + head programs on CPU).

Layout of a step's T tokens: [Td decode tokens | Tp prefill tokens], Td from
`EngineConfig.step_buckets()` (decode-only, prefill-only and mixed steps); each prefill chunk is padded to
a multiple of `block_q` so a query block never spans two sequences. Rows (one per sequence that
may sample) are [Td decode rows | max_prefill_seqs prefill rows], the prefill rows only in steps
that prefill (each row costs a full LM-head product: 4 idle rows made a 0.6B decode step 14 ms
slower). Every (Td, Tp) pair is
compiled at start-up (`warmup`), so serving never compiles. With adapters, steps whose rows
carry a LoRA mix use a second, coarser grid (`EngineConfig.lora_buckets`, which says why), each
compiled with the step's LoRA pairs; steps without one run the base compile and trace no LoRA.

Penalty state lives on the device in tables indexed by the sequence's persistent slot:
`counts[slot, v]` (output tokens, for presence/frequency) and `seen[slot, v]` (prompt and
output, for repetition). `admit` fills a slot's rows when a sequence (re)enters the batch.

With a device mesh (tensor parallelism, hyprjax/sharding.py) the runner places the weights, the
KV pool and the penalty tables per the sharding rules, and the step pins its carried outputs
(pool, penalty tables) to those same shardings and what the host reads back to replicated, so
each step's inputs are placed exactly as the last step's outputs and no bucket compiles twice.
Without a mesh none of this runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ..config import ModelConfig
from ..kernels.lora import LoraPairs
from ..quant import is_quantized
from ..sharding import kernel_sharding, shard_params, step_shardings
from .paged import LoraStep, PagedMeta, init_kv_pool, kv_storage_dtype, resolve_kv_dtype
from ..sampling import SamplingArrays, SamplingParams
from .config import EngineConfig
from .step import SpecInputs, StepInputs, fused_step, layerwise_step, split_layerwise

log = logging.getLogger("hyprjax.engine")


def _admit(counts, seen, slot, seen_ids, count_ids, *, sharding=None):
    """Reset slot's penalty rows: seen <- seen_ids (prompt + outputs), counts <- count_ids (outputs)."""
    v = counts.shape[1]
    counts = counts.at[slot].set(0).at[slot, jnp.where(count_ids >= 0, count_ids, v)].add(1, mode="drop")
    seen = seen.at[slot].set(False).at[slot, jnp.where(seen_ids >= 0, seen_ids, v)].set(True, mode="drop")
    if sharding is not None:  # the penalty tables' NamedSharding under a mesh
        counts, seen = jax.lax.with_sharding_constraint((counts, seen), (sharding, sharding))
    return counts, seen


_ADMIT = jax.jit(_admit, donate_argnums=(0, 1), static_argnames=("sharding",))


@dataclass
class StepResult:
    tokens: np.ndarray  # i32[R]
    logprob: np.ndarray  # f32[R]
    top_ids: np.ndarray  # i32[R, max_logprobs]
    top_logprobs: np.ndarray  # f32[R, max_logprobs]


@dataclass
class SpecResult:
    """A verify step's results per group: row j of group g is its j-th emitted token (-1 after the
    accepted drafts and the one token drawn where the first was rejected)."""

    tokens: np.ndarray  # i32[G, K1]
    accepted: np.ndarray  # i32[G] drafts accepted
    logprob: np.ndarray  # f32[G, K1]
    top_ids: np.ndarray  # i32[G, K1, max_logprobs]
    top_logprobs: np.ndarray  # f32[G, K1, max_logprobs]


@dataclass
class RowRequest:
    """What the runner needs of one scheduled sequence (the engine builds these)."""

    token_ids: list[int]  # the tokens to feed
    start: int  # position of the first of them
    block_table: list[int]
    slot: int
    samples: bool  # does this chunk end at the sequence's last token
    output_index: int  # index of the token it samples
    params: SamplingParams
    key: np.ndarray  # u32[2] the request's key data
    wants_logprobs: bool
    lora: tuple[tuple[int, float], ...] = ()  # (slot, weight) of each adapter in the sequence's mix


class ModelRunner:
    """Owns the device state (weights, KV pool, penalty tables) and the compiled step buckets."""

    def __init__(self, model, cfg: ModelConfig, ecfg: EngineConfig, *, num_pages: int, max_model_len: int,
                 backend: str, interpret: bool = False, lora_tables=None, mesh=None, sparse_tables=None,
                 slot_parts=None):
        self.cfg, self.ecfg = cfg, ecfg
        self.graphdef, self.state = nnx.split(model)
        self._model = model  # its kernels share arrays with self.state: merged mode updates both
        if mesh is not None:  # a no-op for weights the caller already placed (LLM, serve)
            self.state = shard_params(self.state, cfg, mesh)
        dtype = model.compute_dtype  # weights may be int8 (hyprjax/quant.py)
        self.num_pages, self.page_size = num_pages, ecfg.page_size
        self.max_pages = -(-max_model_len // ecfg.page_size)
        self.backend, self.interpret = backend, interpret
        # the pool's storage type: uint16 for bfloat16 values on the XLA path (paged.kv_storage_dtype)
        self.kv_dtype = resolve_kv_dtype(ecfg.kv_cache_dtype, dtype, is_quantized(model))
        self._kv_dtype = kv_storage_dtype(self.kv_dtype, backend)
        self.shardings = step_shardings(cfg, mesh, num_pages, ecfg.page_size, ecfg.max_num_seqs)
        self._kernel_sharding = kernel_sharding(cfg, mesh)
        self.reset_state()
        self.lora_tables = lora_tables  # callable -> the registry's current slot tables, or None
        self.sparse_tables = sparse_tables or dict  # callable -> the registry's sparse tables ({} if none)
        self.slot_parts = slot_parts or (lambda slot: _LOW_RANK)  # slot -> its parts ("lora", "sparse", "block")
        kw = dict(max_logprobs=ecfg.max_logprobs, shardings=self.shardings)
        if isinstance(model.layers, nnx.List):  # one array per layer (CPU): a program per layer (step.py)
            graph, self.state = split_layerwise(self.graphdef, self.state, cfg, self.shardings and self.shardings.replicated)
            self._step = layerwise_step(graph, **kw)
        else:
            self._step = fused_step(self.graphdef, **kw)
        self._admit = _ADMIT if self.shardings is None else partial(_ADMIT, sharding=self.shardings.penalties)
        self._decode_buckets = ecfg.decode_buckets()
        self._mixed_decode_buckets = ecfg.mixed_decode_buckets()
        self._prefill_buckets = ecfg.prefill_buckets()
        self._lora_decode_buckets, self._lora_prefill_buckets = ecfg.lora_buckets()
        self._spec_buckets = ecfg.spec_buckets()

    def kernel_sites(self) -> dict:
        """(layer, module) -> (get, set) over each float linear kernel [din, dout] the step reads,
        for merged mode (hyprjax/adapters/merged.py). `set` replaces the array in the step's
        state and in the model's Param alike, so both keep sharing it. Kernels that are
        quantized, or that the step does not share with the model (placed anew under tensor
        parallelism), have no site."""
        from ..adapters.lora import MODULE_BLOCK
        from ..adapters.merged import stacked_site
        from .step import LayerwiseState

        def param(layer_module, module):
            p = getattr(getattr(getattr(layer_module, MODULE_BLOCK[module]), module, None), "kernel", None)
            ok = isinstance(p, nnx.Variable) and jnp.issubdtype(p.get_value().dtype, jnp.floating)
            return p if ok else None

        sites = {}
        if isinstance(self.state, LayerwiseState):
            for i, layer_module in enumerate(self._model.layers):
                for module in MODULE_BLOCK:
                    p = param(layer_module, module)
                    j = None if p is None else next((j for j, a in enumerate(self.state.layers[i]) if a is p.get_value()),
                                                    None)
                    if j is None:
                        continue

                    def get(i=i, j=j):
                        return self.state.layers[i][j]

                    def put(value, i=i, j=j, p=p):
                        self.state.layers[i][j] = value
                        p.set_value(value)

                    sites[i, module] = (get, put)
            return sites
        for module in MODULE_BLOCK:
            p = param(self._model.layers, module)
            if p is None:
                continue

            def get_stack(p=p):
                return p.get_value()

            def set_stack(value, p=p):
                leaves, treedef = jax.tree_util.tree_flatten(self.state)
                at = next((k for k, a in enumerate(leaves) if a is p.get_value()), None)
                assert at is not None, "the step's state no longer shares this kernel with the model"
                leaves[at] = value
                self.state = jax.tree_util.tree_unflatten(treedef, leaves)
                p.set_value(value)

            if any(a is p.get_value() for a in jax.tree_util.tree_leaves(self.state)):
                for i in range(self.cfg.num_layers):
                    sites[i, module] = stacked_site(get_stack, set_stack, i)
        return sites

    def reset_state(self) -> None:
        """Fresh KV pool and penalty tables (zeros), e.g. after a failed step deleted the donated
        ones. Every page's contents are lost: the caller must drop the block manager's state."""
        s = self.shardings
        self.cache = init_kv_pool(self.cfg, self.num_pages, self.page_size, self._kv_dtype, s and s.kv)
        self.counts = jnp.zeros((self.ecfg.max_num_seqs, self.cfg.vocab_size), jnp.int32, device=s and s.penalties)
        self.seen = jnp.zeros((self.ecfg.max_num_seqs, self.cfg.vocab_size), bool, device=s and s.penalties)

    def state_lost(self) -> bool:
        """Were the device buffers donated to a step that failed (so they are deleted now)?"""
        return any(x.is_deleted() for x in jax.tree.leaves((self.cache, self.counts, self.seen)))

    # ---- packing -------------------------------------------------------------------------

    def _prefill_rows(self, tp: int) -> int:
        return self.ecfg.max_prefill_seqs if tp else 0

    def _bucket(self, buckets: list[int], n: int) -> int:
        for b in buckets:
            if b >= n:
                return b
        raise ValueError(f"step of {n} tokens exceeds the largest bucket {buckets[-1]}")

    def pack(self, decodes: list[RowRequest | None], prefills: list[RowRequest], spec: tuple | None = None
             ) -> tuple[StepInputs, SamplingArrays, LoraStep | None, list]:
        """Host arrays for one step (decode rows first, then up to max_prefill_seqs prefill rows),
        the step's LoRA pairs (None when no row has an adapter: the step then runs the base-model
        compile of its bucket), and the row of each request in input order.

        `spec` = (K1, [drafts of each group]) makes it a verify step (`run_spec`): decode row i is
        group i // K1's position i % K1, and None rows are padding."""
        ps, bq = self.page_size, self.ecfg.block_q
        real = [r for r in decodes if r is not None]
        with_lora = any(r.lora for r in real) or any(r.lora for r in prefills)
        pf_tokens = sum(-(-len(r.token_ids) // bq) * bq for r in prefills)
        dec_grid = self._mixed_decode_buckets if pf_tokens else self._decode_buckets  # EngineConfig.step_buckets
        if spec is not None:
            dec_grid = self._spec_buckets
        elif with_lora:
            dec_grid = self._lora_decode_buckets
        td = self._bucket(dec_grid, len(decodes)) if decodes else 0
        tp = self._bucket(self._lora_prefill_buckets if with_lora else self._prefill_buckets, pf_tokens)
        t, nrows = td + tp, td + self._prefill_rows(tp)
        tokens = np.zeros(t, np.int32)
        positions = np.full(t, -1, np.int32)
        slots = np.full(t, -1, np.int32)
        dec_seq = np.full(td, -1, np.int32)
        pf_seq = np.full(tp // bq, -1, np.int32)
        table = np.zeros((nrows, self.max_pages), np.int32)
        ctx = np.zeros(nrows, np.int32)
        logit_index = np.zeros(nrows, np.int32)
        row_slot = np.zeros(nrows, np.int32)
        row_step = np.zeros(nrows, np.int32)
        active = np.zeros(nrows, bool)
        params: list[SamplingParams] = [_GREEDY] * nrows
        keys = np.zeros((nrows, 2), np.uint32)
        want_lp = False

        def place(row: int, r: RowRequest, at: int):
            n = len(r.token_ids)
            pos = np.arange(r.start, r.start + n)
            bt = np.asarray(r.block_table, np.int32)
            tokens[at:at + n] = r.token_ids
            positions[at:at + n] = pos
            slots[at:at + n] = bt[pos // ps] * ps + pos % ps
            table[row, :len(bt)] = bt
            ctx[row] = r.start + n
            logit_index[row] = at + n - 1
            row_slot[row], row_step[row], active[row] = r.slot, r.output_index, r.samples
            params[row], keys[row] = r.params, r.key
            return n

        dec_pairs, pf_pairs = {}, {}  # part -> [(slot, start, weight)]
        for i, r in enumerate(decodes):
            if r is None:
                continue
            place(i, r, i)
            dec_seq[i] = i
            for slot, w in r.lora:
                for part in self.slot_parts(slot):
                    dec_pairs.setdefault(part, []).append((slot, i, w))
        at = td
        for j, r in enumerate(prefills):
            row = td + j
            n = place(row, r, at)
            blocks = -(-n // bq)
            pf_seq[(at - td) // bq:(at - td) // bq + blocks] = row
            for slot, w in r.lora:
                for part in self.slot_parts(slot):
                    pf_pairs.setdefault(part, []).extend((slot, at - td + k * bq, w) for k in range(blocks))
            at += blocks * bq
        want_lp = any(r.wants_logprobs and r.samples for r in real + prefills)
        spec_inputs, dec_block_q = None, 1
        if spec is not None:
            k1, num_drafts = spec
            groups = np.zeros(td // k1, np.int32)
            groups[:len(num_drafts)] = num_drafts
            spec_inputs = SpecInputs(jax.device_put(groups), group=k1)
            if self.backend == "xla":
                # A group attends as one causal block of K + 1 rows through its last real row's
                # page-table row (its whole context; each row's position masks what it sees): the
                # sequence's pages are gathered once per layer instead of once per row, which on
                # CPU made 8 rows' attention 2.4x cheaper (docs/speculative.md). The Pallas
                # kernels keep one row per block.
                dec_block_q = k1
                dec_seq = np.array([g * k1 + n for g, n in enumerate(num_drafts)]
                                   + [-1] * (td // k1 - len(num_drafts)), np.int32)
        # device_put, not jnp.asarray: in JAX 0.10 the latter stages numpy arrays through a
        # per-shape jit, which would compile during serving.
        put = jax.device_put
        meta = PagedMeta(put(slots), put(dec_seq), put(pf_seq), put(table), put(ctx), block_q=bq,
                         backend=self.backend, interpret=self.interpret, sharding=self._kernel_sharding,
                         dec_block_q=dec_block_q)
        inp = StepInputs(put(tokens), put(positions), meta, put(logit_index), put(row_slot), put(row_step),
                         put(active), put(np.asarray(want_lp)), spec_inputs)
        order = list(range(len(decodes))) + [td + j for j in range(len(prefills))]
        lora = self._lora_step(td, tp, dec_pairs, pf_pairs) if with_lora else None
        return inp, SamplingArrays.from_rows(params, keys), lora, order

    def _lora_step(self, td: int, tp: int, dec_pairs: dict, pf_pairs: dict) -> LoraStep:
        """The step's adapter tables and pairs, per part (padded to the bucket's capacity)."""
        nd, np_ = td * self.ecfg.max_loras, tp // self.ecfg.block_q * self.ecfg.max_loras
        sparse = self.sparse_tables()
        return LoraStep(self.lora_tables(), _pairs(dec_pairs.get("lora", []), nd), _pairs(pf_pairs.get("lora", []), np_),
                        sparse, {part: (_pairs(dec_pairs.get(part, []), nd), _pairs(pf_pairs.get(part, []), np_))
                                 for part in sparse})

    # ---- running --------------------------------------------------------------------------

    def run(self, decodes: list[RowRequest], prefills: list[RowRequest]) -> StepResult:
        """Run one step; results are in input order (decodes, then prefills)."""
        inp, sampling, lora, order = self.pack(decodes, prefills)
        out = self._step(self.state, self.cache, self.counts, self.seen, inp, sampling, lora)
        tokens, lp, top_ids, top_lp, self.cache, self.counts, self.seen = out
        tokens, lp, top_ids, top_lp = jax.device_get((tokens, lp, top_ids, top_lp))
        return StepResult(tokens[order], lp[order], top_ids[order], top_lp[order])

    def spec_bucket(self, rows: int) -> int | None:
        """The bucket a verify step of `rows` decode rows runs in, or None if none holds it."""
        return next((b for b in self._spec_buckets if b >= rows), None)

    def run_spec(self, groups: list[tuple[RowRequest, list[int]]], k: int) -> SpecResult:
        """One verify step: each group's sequence feeds its last token and its drafts (<= k), one
        decode row per position (each attends to the pool up to its own position: the K/V of the
        group's earlier rows are written in the same layer call before attention reads them), and
        the head verifies them (step.py `_verify_finish`). Results per group, in input order."""
        k1 = k + 1
        rows: list[RowRequest | None] = []
        for r, drafts in groups:
            feed = r.token_ids + list(drafts)
            rows += [replace(r, token_ids=[feed[j]], start=r.start + j, output_index=r.output_index + j)
                     if j < len(feed) else None for j in range(k1)]
        inp, sampling, lora, _ = self.pack(rows, [], spec=(k1, [len(d) for _, d in groups]))
        out = self._step(self.state, self.cache, self.counts, self.seen, inp, sampling, lora)
        tokens, lp, top_ids, top_lp, accepted, self.cache, self.counts, self.seen = out
        tokens, lp, top_ids, top_lp, accepted = jax.device_get((tokens, lp, top_ids, top_lp, accepted))
        g = len(groups)
        return SpecResult(tokens[:g * k1].reshape(g, k1), accepted[:g], lp[:g * k1].reshape(g, k1),
                          top_ids[:g * k1].reshape(g, k1, -1), top_lp[:g * k1].reshape(g, k1, -1))

    def admit(self, slot: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Fill a slot's penalty rows for a sequence entering (or re-entering) the batch."""
        total = len(prompt_ids) + len(output_ids)  # both padded alike: one compiled shape per length bucket
        seen_ids, count_ids = _pad_ids(prompt_ids + output_ids, total), _pad_ids(output_ids, total)
        self.counts, self.seen = self._admit(self.counts, self.seen, np.int32(slot), jax.device_put(seen_ids),
                                             jax.device_put(count_ids))

    def warmup(self, max_model_len: int, progress: bool = True) -> int:
        """Compile every (decode, prefill) bucket and the admit buckets; returns how many steps ran."""
        combos = [(d, p, False) for d, p in self.ecfg.step_buckets()]
        if self.lora_tables is not None:
            combos += [(d, p, True) for d in self._lora_decode_buckets for p in self._lora_prefill_buckets if d or p]
        k1 = self.ecfg.num_speculative_tokens + 1 if self.ecfg.speculative else 0
        if k1:  # verify steps (their decode rows attend in groups of K + 1 on the XLA path: pack)
            combos += [(d, 0, ("spec", False)) for d in self._spec_buckets]
            if self.lora_tables is not None:
                combos += [(d, 0, ("spec", True)) for d in self._spec_buckets]
        bar = tqdm(combos, desc="compiling step buckets", disable=not progress, leave=False)
        for d, p, with_lora in bar:
            spec = isinstance(with_lora, tuple)
            with_lora = with_lora[1] if spec else with_lora
            bar.set_postfix_str(f"decode={d} prefill={p}" + (" lora" if with_lora else "") + (" verify" if spec else ""))
            inp = self._padding_inputs(d, p)
            if spec:
                inp = replace(inp, spec=SpecInputs(jnp.zeros((d // k1,), jnp.int32), group=k1))
                if self.backend == "xla":  # grouped verify attention (pack)
                    inp = replace(inp, meta=replace(inp.meta, dec_block_seq=jnp.full((d // k1,), -1, jnp.int32),
                                                    dec_block_q=k1))
            lora = self._lora_step(d, p, {}, {}) if with_lora else None
            out = self._step(self.state, self.cache, self.counts, self.seen, inp,
                             SamplingArrays.from_rows([_GREEDY] * inp.row_slot.shape[0],
                                                      np.zeros((inp.row_slot.shape[0], 2), np.uint32)), lora)
            *_, self.cache, self.counts, self.seen = out
        n = 64
        while True:  # admit buckets: ids padded to powers of two >= 64
            self.admit(0, [0] * (n // 2), [0] * (n // 2))
            if n >= max_model_len:
                break
            n *= 2
        s = self.shardings
        self.counts = jnp.zeros_like(self.counts, device=s and s.penalties)
        self.seen = jnp.zeros_like(self.seen, device=s and s.penalties)
        jax.block_until_ready(self.cache)
        return len(combos)


    def _padding_inputs(self, td: int, tp: int) -> StepInputs:
        """All-padding inputs of bucket (td, tp): used to compile that bucket at start-up."""
        ecfg = self.ecfg
        t, r = td + tp, td + self._prefill_rows(tp)
        meta = PagedMeta(jnp.full((t,), -1, jnp.int32), jnp.full((td,), -1, jnp.int32),
                         jnp.full((tp // ecfg.block_q,), -1, jnp.int32), jnp.zeros((r, self.max_pages), jnp.int32),
                         jnp.zeros((r,), jnp.int32), block_q=ecfg.block_q, backend=self.backend,
                         interpret=self.interpret, sharding=self._kernel_sharding)
        zeros = jnp.zeros((r,), jnp.int32)
        return StepInputs(jnp.zeros((t,), jnp.int32), jnp.full((t,), -1, jnp.int32), meta, zeros, zeros, zeros,
                          jnp.zeros((r,), bool), jnp.asarray(False))


_GREEDY = SamplingParams(temperature=0.0)
_LOW_RANK = frozenset({"lora"})


def _pairs(pairs: list[tuple[int, int, float]], capacity: int) -> LoraPairs:
    """Device LoraPairs of `capacity` entries holding `pairs` sorted by (slot, start), so
    consecutive pairs reuse one adapter while it is in cache."""
    assert len(pairs) <= capacity, f"{len(pairs)} LoRA pairs exceed the bucket's {capacity}"
    table = np.zeros((capacity, 3), np.float64)
    if pairs:
        table[:len(pairs)] = sorted(pairs)  # (slot, start, weight) rows
    slot, start, weight = table[:, 0].astype(np.int32), table[:, 1].astype(np.int32), table[:, 2].astype(np.float32)
    put = jax.device_put
    return LoraPairs(put(start), put(slot), put(weight), put(np.int32(len(pairs))))


def _pad_ids(ids: list[int], total: int) -> np.ndarray:
    n = max(64, 1 << (max(total, 1) - 1).bit_length())
    out = np.full(n, -1, np.int32)
    out[:len(ids)] = ids
    return out
