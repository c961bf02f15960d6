"""One engine step on the model: the HF model's own modules and weights over a flat batch of
tokens, attention on the paged KV pool, sampling on the device; decode steps replayed from
CUDA graphs captured per batch-size bucket.

Two step programs over the same modules (so LoRA layers, biases and rope scaling just run):
- `hf`: each decoder layer is called as transformers wrote it; attention goes through the
  attention function registered as `attention.NAME` (the config names it during the step).
- `fused`: the layer's Linear modules are called one by one and the glue between them is
  ours — RMSNorm with the residual add, RoPE with the KV write, SiLU·mul — one Triton kernel
  each on the GPU (`triton_ops`), the torch references elsewhere (`fused`). It cuts a Llama
  layer from ~40 launches to ~13, which is what a small model's decode step is made of.
The GPU runs `fused` when the layer has the Llama shape, the CPU `hf` (same tokens; tested).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from tunelab.inference import attention, fused
from tunelab.inference.attention import AttentionContext, Prefill
from tunelab.inference.sampling import SamplingTensors, sample
from tunelab.inference.scheduler import StepInputs

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral")
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@dataclass
class Parts:
    """The modules a step calls: the decoder (embed_tokens, layers, norm, rotary_emb) and lm_head."""

    decoder: torch.nn.Module
    lm_head: torch.nn.Module
    config: object


def model_parts(model) -> Parts | str:
    """The Llama-architecture parts of `model` (peft-wrapped or not), or why it has none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    kind = getattr(config, "model_type", type(base).__name__)
    if kind not in SUPPORTED:
        return f"{kind} is not a Llama-architecture model ({', '.join(SUPPORTED)})"
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        return f"{kind} with a {window}-token sliding window (the paged kernels attend to the whole context)"
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return "sharded (FSDP) weights (the engine calls the model's modules one by one)"
    decoder, lm_head = getattr(base, "model", None), getattr(base, "lm_head", None)
    if decoder is None or lm_head is None or not all(hasattr(decoder, n) for n in ("embed_tokens", "layers", "norm",
                                                                                     "rotary_emb")):
        return f"{type(base).__name__} does not have the Llama module layout"
    return Parts(decoder, lm_head, config)


def fusable(parts: Parts) -> bool:
    """The layer is exactly Llama's: RMSNorms, q/k/v/o projections, a SiLU-gated MLP."""
    layer = parts.decoder.layers[0]
    a, m = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm, parts.decoder.norm)
    return (all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"))
            and not hasattr(a, "q_norm")
            and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(m.act_fn).__name__ in ("SiLU", "SiLUActivation")
            and all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms))


def workspace_bytes(config, dtype_bytes: int, max_batch_tokens: int, max_seqs: int) -> int:
    """Activation memory of the largest step, stated up front and set aside from the KV budget:
    a prefill step of max_batch_tokens (residual, normed input, q/k/v, attention out, MLP
    gate/up/act, the keys and values its prefill rows gather from the pool, twice over for
    grouped-query heads repeated on torch ≤ 2.11) and the logits + sampling buffers of max_seqs
    rows; ×1.5 for the allocator, + 512 MiB for cuBLAS/Triton workspaces and the graph pool."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or hidden // heads
    per_token = 4 * hidden + 3 * inter + 2 * (heads + 2 * kv_heads) * dim
    gather = 2 * max_batch_tokens * 2 * 2 * heads * dim
    sampling = max_seqs * vocab * (dtype_bytes + 4 * 4 + 8 * 3)  # logits, fp32 copies, sort order + hash ints
    return int(1.5 * (max_batch_tokens * per_token * dtype_bytes + gather * dtype_bytes + sampling)) + (512 << 20)


class ModelRunner:
    """Owns the KV pool tensor and the captured graphs; `step` runs one StepInputs → sampled ids."""

    def __init__(self, model, parts: Parts, *, num_blocks: int, page: int, max_seqs: int, max_blocks: int,
                 graphs: bool, program: str | None = None):
        self.model, self.parts = model, parts
        self.layers = list(parts.decoder.layers)
        weight = parts.decoder.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        config = parts.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.kv = torch.zeros((len(self.layers), 2, num_blocks, page, kv_heads, self.head_dim), dtype=self.dtype,
                              device=self.device)  # (layers, K/V, blocks, page, Hkv, D); zeros: the scratch block too
        self.fast = attention.fast_available(self.device.type, self.dtype)
        self.program = program or ("fused" if self.fast and fusable(parts) else "hf")
        self.graphs = graphs and self.device.type == "cuda"
        self.buckets = [b for b in GRAPH_BUCKETS if b <= max_seqs] or [max_seqs]
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._static = _StaticInputs(self.buckets[-1], max_blocks, self.device) if self.graphs else None
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._tuner = next((m for m in model.modules() if hasattr(m, "active_adapters") and hasattr(m, "disable_adapters")
                            and hasattr(m, "base_layer")), None)
        attention.register()

    # -- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, x: StepInputs) -> list[int]:
        """Run a step and read its sampled ids (the one host sync)."""
        if self.graphable(x):
            try:
                return self.wait(self.launch(x))
            except RuntimeError as err:  # a module that cannot be captured (e.g. it syncs the host)
                log.warning("CUDA graph capture failed (%s); decoding without graphs", err)
                self.graphs = False
        return self._eager(x)

    def try_launch(self, x: StepInputs) -> tuple | None:
        """`launch` for a step that a graph can run; None otherwise (or if its capture failed)."""
        if not self.graphable(x):
            return None
        try:
            return self.launch(x)
        except RuntimeError as err:
            log.warning("CUDA graph capture failed (%s); decoding without graphs", err)
            self.graphs = False
            return None

    def graphable(self, x: StepInputs) -> bool:
        return self.graphs and x.decode_only and len(x.ids) <= self.buckets[-1]

    def captured(self, x: StepInputs) -> bool:
        """Its graph exists (a capture resets the static buffers, so a step launched behind
        another one must not capture)."""
        return self.graphable(x) and self._key(x) in self._graphs

    def _eager(self, x: StepInputs) -> list[int]:
        dev = self.device
        put = lambda a: torch.from_numpy(a).to(dev, non_blocking=True)  # noqa: E731
        nd = x.num_decode
        prefill = None
        if nd < len(x.q_lens):
            q_lens, k_lens = x.q_lens[nd:], x.context_lens[nd:]
            cu = lambda n: put(np.concatenate([[0], np.cumsum(n)]).astype(np.int32))  # noqa: E731
            prefill = Prefill(cu(q_lens), cu(k_lens), int(q_lens.max()), int(k_lens.max()), put(x.context_slots),
                              q_lens.tolist(), k_lens.tolist())
        ctx = AttentionContext(self.kv, put(x.slots), nd, put(x.tables[:nd]) if nd else None,
                               put(x.context_lens[:nd]) if nd else None, prefill, self.fast)
        logits = self._logits(ctx, put(x.ids), put(x.positions), put(x.sample_rows))
        sampling = SamplingTensors(put(x.temperature), put(x.top_k), put(x.top_p), put(x.seed), put(x.index))
        return sample(logits.float(), sampling, x.mode).tolist()

    def _logits(self, ctx: AttentionContext, ids, positions, rows) -> torch.Tensor:
        """ids, positions (T,) → logits of the rows `rows` (S,) (None: all T)."""
        ctx.index = None  # a captured step's context is reused: no gather index from the call before
        attention.context = ctx
        try:
            with self._attention_named():
                hidden = self._forward_hf(ids, positions) if self.program == "hf" else self._forward_fused(ids, positions)
        finally:
            attention.context = None
        return self.parts.lm_head(hidden if rows is None else hidden.index_select(0, rows))

    @contextlib.contextmanager
    def _attention_named(self):
        """The `hf` program's layers look attention up by the config's name; name ours for the step."""
        if self.program != "hf":
            yield
            return
        config = self.parts.config
        before = config._attn_implementation
        config._attn_implementation = attention.NAME
        try:
            yield
        finally:
            config._attn_implementation = before

    def _forward_hf(self, ids, positions) -> torch.Tensor:
        decoder = self.parts.decoder
        h = decoder.embed_tokens(ids)[None]  # (1, T, H)
        pos = positions[None]
        cos_sin = decoder.rotary_emb(h, pos)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=pos, past_key_values=None, use_cache=False,
                      position_embeddings=cos_sin)
            h = h[0] if isinstance(h, tuple) else h  # transformers < 5 returned a tuple
        return decoder.norm(h)[0]  # (T, H)

    def _forward_fused(self, ids, positions) -> torch.Tensor:
        decoder, fast, slots = self.parts.decoder, self.fast, attention.context.slots
        tokens = ids.shape[0]
        residual = decoder.embed_tokens(ids)  # (T, H), updated in place by each residual add
        cos, sin = (t[0] for t in decoder.rotary_emb(residual, positions[None]))  # (T, D)
        first = self.layers[0].input_layernorm
        x = fused.rmsnorm(residual, first.weight, first.variance_epsilon, fast=fast)
        for i, layer in enumerate(self.layers):
            a, m, post = layer.self_attn, layer.mlp, layer.post_attention_layernorm
            q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)  # (T, H·D)
            fused.rope_write(q, k, v, cos, sin, self.kv[i], slots, fast)
            o = attention.attend(i, q.view(tokens, -1, self.head_dim), a.scaling)  # (T, Hq, D)
            x = fused.rmsnorm(a.o_proj(o.reshape(tokens, -1)), post.weight, post.variance_epsilon, residual, fast)
            y = m.down_proj(fused.silu_mul(m.gate_proj(x), m.up_proj(x), fast))
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else decoder.norm
            x = fused.rmsnorm(y, norm.weight, norm.variance_epsilon, residual, fast)
        return x

    # -- CUDA graphs --------------------------------------------------------------------------
    def _adapter_state(self) -> tuple | None:
        """What peft will run (graphs hold the kernels of the adapters active at capture)."""
        t = self._tuner
        return None if t is None else (tuple(t.active_adapters), bool(t.disable_adapters), bool(t.merged))

    def _key(self, x: StepInputs) -> tuple:
        return next(b for b in self.buckets if b >= len(x.ids)), x.mode, self._adapter_state()

    @torch.no_grad()
    def launch(self, x: StepInputs, src: list[int] | None = None) -> tuple:
        """Queue a decode step's graph without waiting for it. src: for each row, the row of the
        step queued just before whose drawn token is this row's input (still on the device)."""
        key = self._key(x)
        graph = self._graphs.get(key) or self._capture(key)
        out = self._static.load(x, key[0], src)
        graph.replay()
        return self._static.read_back(out, len(x.ids))

    @staticmethod
    def wait(pending: tuple) -> list[int]:
        """The sampled ids of a launched step (waits for it)."""
        event, host, n = pending
        if event is not None:
            event.synchronize()
        return host[:n].tolist()

    @torch.no_grad()
    def capture(self, up_to: int | None = None) -> int:
        """Capture the greedy decode graphs of every bucket up to `up_to` sequences, largest first
        (the smaller ones then fit in its memory pool); returns how many."""
        if not self.graphs:
            return 0
        todo = [b for b in reversed(self.buckets) if b <= (up_to or self.buckets[-1])]
        for b in todo:
            key = (b, "greedy", self._adapter_state())
            if key not in self._graphs:
                self._capture(key)
        return len(todo)

    @torch.no_grad()
    def _capture(self, key: tuple) -> torch.cuda.CUDAGraph:
        bucket, mode, _state = key
        st = self._static
        st.reset(bucket)  # the warm-up runs for real: every row on the scratch block
        ctx = AttentionContext(self.kv, st.slots[:bucket], bucket, st.tables[:bucket], st.lens[:bucket], None, self.fast)
        sampling = SamplingTensors(st.temperature[:bucket], st.top_k[:bucket], st.top_p[:bucket], st.seed[:bucket],
                                   st.index[:bucket])

        def body():
            logits = self._logits(ctx, st.ids[:bucket], st.pos[:bucket], None)
            st.out[:bucket].copy_(sample(logits.float(), sampling, mode))

        self._graphs[key] = graph = record(body, self._pool, self.device)
        return graph


def record(body, pool, device) -> torch.cuda.CUDAGraph:
    """Run `body` once on a side stream (Triton compiles, cuBLAS sets up: outside the capture),
    then capture it into a graph that shares `pool` with the others."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    return graph


class _StaticInputs:
    """The captured graphs' inputs and output at fixed addresses, filled from a pinned host buffer
    with one copy per step: [ids | pos | slots | lens | top_k | seed | index | src | tables] as
    int64 (S each, tables S × W) and [temperature | top_p] as float32. Host buffers come in
    pairs: a step is filled while the one before may still be copying from the other."""

    SEGMENTS = 8

    def __init__(self, max_seqs: int, width: int, device):
        s, self.s, self.w = max_seqs, max_seqs, width
        self.cuda = torch.device(device).type == "cuda"
        pinned = lambda t: t.pin_memory() if self.cuda else t  # noqa: E731 — async copies need pinned memory
        self.host = [pinned(torch.zeros(self.SEGMENTS * s + s * width, dtype=torch.int64)) for _ in range(2)]
        self.host_f = [pinned(torch.zeros(2 * s, dtype=torch.float32)) for _ in range(2)]
        self.host_out = [pinned(torch.zeros(s, dtype=torch.int64)) for _ in range(2)]
        self.turn = 0
        self.dev = torch.zeros(self.host[0].shape, dtype=torch.int64, device=device)
        self.dev_f = torch.zeros(self.host_f[0].shape, dtype=torch.float32, device=device)
        self.ids, self.pos, self.slots, self.lens, self.top_k, self.seed, self.index, self.src = (
            self.dev[i * s : (i + 1) * s] for i in range(self.SEGMENTS))
        self.tables = self.dev[self.SEGMENTS * s :].view(s, width)
        self.temperature, self.top_p = self.dev_f[:s], self.dev_f[s:]
        self.out = torch.zeros(s, dtype=torch.int64, device=device)

    def reset(self, bucket: int) -> None:
        """Every row a one-token context on scratch slot 0, greedy."""
        self.dev.zero_()
        self.lens[:bucket].fill_(1)
        self.dev_f.zero_()

    def load(self, x: StepInputs, bucket: int, src: list[int] | None) -> int:
        """x's rows, then bucket − n padding rows on the scratch block (slot 0, one token, greedy);
        with src, the input ids are gathered on the device from the previous step's output.
        Returns the host buffer pair used."""
        turn, self.turn = self.turn, 1 - self.turn
        h, hf = self.host[turn].numpy(), self.host_f[turn].numpy()
        n, s = len(x.ids), self.s
        for i, values in enumerate((x.ids, x.positions, x.slots, x.context_lens, x.top_k, x.seed, x.index,
                                    src if src is not None else 0)):
            h[i * s : i * s + n] = values
            h[i * s + n : i * s + bucket] = 1 if i == 3 else 0
        tables = self.SEGMENTS * s
        h[tables : tables + n * self.w] = x.tables.reshape(-1)
        h[tables + n * self.w : tables + bucket * self.w] = 0
        hf[:n], hf[n:bucket] = x.temperature, 0
        hf[s : s + n], hf[s + n : s + bucket] = x.top_p, 1
        end = tables + bucket * self.w
        self.dev[:end].copy_(self.host[turn][:end], non_blocking=True)
        self.dev_f.copy_(self.host_f[turn], non_blocking=True)
        if src is not None:
            self.ids[:n] = self.out.index_select(0, self.src[:n])  # ordered after the step before, on the stream
        return turn

    def read_back(self, turn: int, n: int) -> tuple:
        """Queue the copy of the drawn ids to the host; (event, host buffer, n) for `wait`."""
        host = self.host_out[turn]
        host[:n].copy_(self.out[:n], non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return event, host, n
