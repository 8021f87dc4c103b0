"""One decode block, or every layer of a decode step, in one call of moelab's kernels (cpu_kernels.c:
moelab_attention_block, moelab_moe_block, moelab_decode_layers): their fixed arguments as C structures built once,
and the calls."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from moelab.inference.native import build
from moelab.inference.native.ops import (
    ACTIVATIONS,
    IO_DTYPES,
    NativeWeight,
    _check_number,
    _check_tensor,
    available,
    same_format,
)


class _AttnArgs(ctypes.Structure):
    _fields_ = [*((n, ctypes.c_int32) for n in ("bf16", "H", "G", "Dh", "rot", "qk_full")),
                *((n, ctypes.c_float) for n in ("eps", "qk_eps", "scale")),
                *((n, ctypes.c_void_p) for n in ("norm_w", "qkv_bias", "q_w", "k_w", "o_bias", "wqkv", "wo"))]


class _MoEArgs(ctypes.Structure):
    _fields_ = [("bf16", ctypes.c_int32), ("E", ctypes.c_int32), ("k", ctypes.c_int32), ("renorm", ctypes.c_int32),
                ("activation", ctypes.c_int32), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("norm_w", ctypes.c_void_p), ("router_w", ctypes.c_void_p), ("gate_up", ctypes.c_void_p),
                ("down", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn", ctypes.c_void_p), ("moe", ctypes.c_void_p), ("kbuf", ctypes.c_void_p),
                ("vbuf", ctypes.c_void_p), ("sg", ctypes.c_longlong), ("sl", ctypes.c_longlong),
                ("sb", ctypes.c_longlong)]


class BlockArgs:
    """The fixed arguments of one block's kernel call — a C structure of pointers into weights and tensors that
    it keeps alive — for activations of `dtype`. Not copied with a model (a copy's tensors live elsewhere)."""

    __slots__ = ("struct", "keep", "dtype")

    def __init__(self, struct: ctypes.Structure, keep: tuple, dtype: torch.dtype) -> None:
        self.struct, self.keep, self.dtype = struct, keep, dtype

    def __deepcopy__(self, memo: dict) -> None:
        return None


def attention_args(norm_weight: Tensor, eps: float, wqkv: NativeWeight, qkv_bias: Tensor | None,
                   qk_norms: tuple[Tensor, Tensor, float] | None, rotary_dim: int, wo: NativeWeight,
                   o_bias: Tensor | None, n_heads: int, n_kv: int, head_dim: int,
                   scale: float | None) -> BlockArgs | None:
    """`attention_block`'s fixed arguments for a grouped-query attention layer, or None where the kernel does not
    take them: the norms' weights and the biases must share one dtype (float32 or bfloat16) and be contiguous,
    head_dim % 16 == 0, at most 16 query heads per kv head, rotary_dim <= head_dim. q/k norms (q_w, k_w, eps)
    of width head_dim act per head; of width n_heads·head_dim and n_kv·head_dim, over all heads at once."""
    _check_tensor("norm_weight", norm_weight)
    _check_number("eps", eps)
    for name, w in (("wqkv", wqkv), ("wo", wo)):
        if not isinstance(w, NativeWeight):
            raise ValueError(f"moelab native: {name} must be a NativeWeight; got {type(w).__name__}")
    for name, b in (("qkv_bias", qkv_bias), ("o_bias", o_bias)):
        if b is not None:
            _check_tensor(name, b)
    for name, v in (("n_heads", n_heads), ("n_kv", n_kv), ("head_dim", head_dim), ("rotary_dim", rotary_dim)):
        if not isinstance(v, int) or v < (0 if name == "rotary_dim" else 1) or v > 1 << 16:
            raise ValueError(f"moelab native: {name}={v!r} is not allowed: a positive integer (rotary_dim: >= 0)")
    if rotary_dim % 2:
        raise ValueError(f"moelab native: rotary_dim={rotary_dim} is not allowed: an even number (rotate-half)")
    if scale is not None:
        _check_number("scale", scale)
    if qk_norms is not None:
        if not isinstance(qk_norms, tuple) or len(qk_norms) != 3:
            raise ValueError("moelab native: qk_norms must be None or (q_weight, k_weight, eps)")
        _check_tensor("qk_norms[0]", qk_norms[0])
        _check_tensor("qk_norms[1]", qk_norms[1])
        _check_number("qk_norms[2]", qk_norms[2])
    q_w, k_w, qk_eps = qk_norms if qk_norms is not None else (None, None, 0.0)
    full = q_w is not None and q_w.numel() == n_heads * head_dim and n_heads > 1
    if q_w is not None and (q_w.numel(), k_w.numel()) not in ((head_dim, head_dim),
                                                              (n_heads * head_dim, n_kv * head_dim)):
        return None
    dtype, D, nq, nqkv = norm_weight.dtype, wqkv.k, n_heads * head_dim, (n_heads + 2 * n_kv) * head_dim
    small = [t for t in (norm_weight, qkv_bias, q_w, k_w, o_bias) if t is not None]
    if (dtype not in IO_DTYPES or any(t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu"
                                      for t in small)
            or (norm_weight.numel(), wqkv.n, wo.k, wo.n) != (D, nqkv, nq, D)
            or (qkv_bias is not None and qkv_bias.numel() != nqkv) or (o_bias is not None and o_bias.numel() != D)
            or head_dim % 16 or n_heads % n_kv or n_heads // n_kv > 16 or rotary_dim > head_dim or not available()):
        return None
    struct = _AttnArgs(int(dtype == torch.bfloat16), n_heads, n_kv, head_dim, rotary_dim, int(full), eps, qk_eps,
                       head_dim ** -0.5 if scale is None else scale, *(_ptr(t) for t in (norm_weight, qkv_bias, q_w,
                                                                                         k_w, o_bias)),
                       ctypes.addressof(wqkv.desc), ctypes.addressof(wo.desc))
    return BlockArgs(struct, (*small, wqkv, wo), dtype)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _tables(cos: Tensor, sin: Tensor, rotary_dim: int) -> tuple[Tensor, Tensor]:
    if not isinstance(cos, Tensor) or not isinstance(sin, Tensor) or cos.device.type != "cpu" \
            or sin.device.type != "cpu" or not cos.is_floating_point() or not sin.is_floating_point():
        raise ValueError("the rotary tables cos, sin must be floating-point CPU tensors [1, rotary_dim]")
    if cos.shape != (1, rotary_dim) or sin.shape != cos.shape:
        raise ValueError(f"rotary tables of shape {tuple(cos.shape)}: one position of {rotary_dim} channels expected")
    return cos.float().contiguous(), sin.float().contiguous()


def attention_block(args: BlockArgs, x: Tensor, cos: Tensor, sin: Tensor, k_buf: Tensor, v_buf: Tensor,
                    L: int) -> Tensor:
    """x + attention(RMSNorm(x)) for one token x [1, 1, D] of args' dtype, appending its key and value at position
    L of the cache buffers [1, G, capacity, Dh] (`cpu_kernels.c`, moelab_attention_block, states the steps
    and roundings); cos, sin [1, rotary_dim]."""
    _check_args(args, _AttnArgs)
    _check_token(args.dtype, x)
    _check_cache(args, k_buf, v_buf, L)
    cos, sin = _tables(cos, sin, args.struct.rot)
    out = torch.empty_like(x)
    lib = build.library()
    if lib.moelab_attention_block(ctypes.addressof(args.struct), x.data_ptr(), out.data_ptr(), cos.data_ptr(),
                                  sin.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), k_buf.stride(1), k_buf.stride(2),
                                  L, torch.get_num_threads()):
        raise MemoryError("moelab native attention_block: out of memory for its buffers")
    return out


def _check_args(args, kind: type) -> None:
    if not isinstance(args, BlockArgs) or not isinstance(args.struct, kind):
        maker = "attention_args" if kind is _AttnArgs else "moe_args"
        raise ValueError(f"moelab native: args must be the BlockArgs of {maker}; got {type(args).__name__}")


def _check_token(dtype: torch.dtype, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.device.type != "cpu":
        raise ValueError(f"a block kernel takes one CPU token tensor: got {type(x).__name__}")
    if x.dtype != dtype or not x.is_contiguous() or x.numel() != x.shape[-1]:
        raise ValueError(f"a block kernel takes one contiguous token of {dtype}: got {x.dtype} {tuple(x.shape)}")


def _check_cache(args: BlockArgs, k_buf: Tensor, v_buf: Tensor, L: int, rows: int | None = 1) -> None:
    """Cache buffers [rows, G, capacity > L, Dh] of args' dtype, one layout (rows None: any number)."""
    s = args.struct
    want = "B" if rows is None else rows
    if not all(isinstance(b, Tensor) and b.device.type == "cpu" and b.dim() == 4 for b in (k_buf, v_buf)) \
            or not isinstance(L, int):
        raise ValueError(f"the cache buffers must be CPU tensors [{want}, {s.G}, capacity, {s.Dh}] and L an int")
    if (k_buf.dtype != args.dtype or v_buf.stride() != k_buf.stride() or k_buf.shape != v_buf.shape
            or k_buf.stride(-1) != 1 or (rows is not None and k_buf.shape[0] != rows) or k_buf.shape[1] != s.G
            or k_buf.shape[-1] != s.Dh or not 0 <= L < k_buf.shape[2]):
        raise ValueError(f"the cache buffers must be [{want}, {s.G}, capacity > {L}, {s.Dh}] of {args.dtype}, "
                         "one layout")


class ExpertTable:
    """The E experts of a layer as `moe_block` takes them: their first and second projections' descriptors (the
    NativeWeights must outlive the table; it keeps them)."""

    __slots__ = ("weights", "gate_up", "down", "n")

    def __init__(self, gate_ups: list[NativeWeight], downs: list[NativeWeight]) -> None:
        self.weights, self.n = (gate_ups, downs), len(gate_ups)
        self.gate_up = (ctypes.c_void_p * self.n)(*(ctypes.addressof(w.desc) for w in gate_ups))
        self.down = (ctypes.c_void_p * self.n)(*(ctypes.addressof(w.desc) for w in downs))


def expert_table(gate_ups: list[NativeWeight | None], downs: list[NativeWeight | None]) -> ExpertTable | None:
    """An ExpertTable of these experts, or None unless all run on these kernels in one format (`same_format`)."""
    if not isinstance(gate_ups, (list, tuple)) or not isinstance(downs, (list, tuple)) or not gate_ups \
            or len(gate_ups) != len(downs):
        raise ValueError("moelab native: gate_ups and downs must be lists of one length >= 1")
    return ExpertTable(gate_ups, downs) if same_format(gate_ups) and same_format(downs) else None


def moe_args(norm_weight: Tensor, eps: float, router_ED: Tensor, k: int, renorm: bool, scale: float,
             experts: ExpertTable, activation: str) -> BlockArgs | None:
    """`moe_block`'s fixed arguments for an MoE layer (router float32 [E, D], routed as `route`), or None where the
    kernel does not take them (the norm's weight float32 or bfloat16, contiguous, on the CPU)."""
    if not isinstance(experts, ExpertTable):
        raise ValueError(f"moelab native: experts must be an ExpertTable; got {type(experts).__name__}")
    _check_tensor("norm_weight", norm_weight)
    _check_tensor("router_ED", router_ED)
    for name, v in (("eps", eps), ("scale", scale), ("renorm", renorm)):
        _check_number(name, v)
    if not isinstance(k, int) or not 1 <= k <= experts.n:
        raise ValueError(f"moelab native: k={k!r} is not allowed: expected an integer in [1, E={experts.n}]")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"moelab native: activation={activation!r} is not allowed: one of {', '.join(ACTIVATIONS)}")
    dtype = norm_weight.dtype
    if (dtype not in IO_DTYPES or not norm_weight.is_contiguous() or norm_weight.device.type != "cpu"
            or router_ED.dtype != torch.float32 or not router_ED.is_contiguous() or router_ED.shape[0] != experts.n
            or not norm_weight.numel() == experts.weights[0][0].k == experts.weights[1][0].n == router_ED.shape[1]
            or not available()):
        return None
    struct = _MoEArgs(int(dtype == torch.bfloat16), experts.n, k, int(renorm), ACTIVATIONS[activation], eps, scale,
                      norm_weight.data_ptr(), router_ED.data_ptr(), ctypes.addressof(experts.gate_up),
                      ctypes.addressof(experts.down))
    return BlockArgs(struct, (norm_weight, router_ED, experts), dtype)


def moe_block(args: BlockArgs, x: Tensor) -> tuple[Tensor, Tensor]:
    """x + MoE(RMSNorm(x)) for one token x [1, 1, D] of args' dtype, routed by `route` to k experts; (out, the
    chosen experts [k] int64). The steps and roundings: `cpu_kernels.c`, moelab_moe_block."""
    _check_args(args, _MoEArgs)
    _check_token(args.dtype, x)
    out, idx = torch.empty_like(x), torch.empty(args.struct.k, dtype=torch.int64)
    if build.library().moelab_moe_block(ctypes.addressof(args.struct), x.data_ptr(), out.data_ptr(), idx.data_ptr(),
                                   torch.get_num_threads()):
        raise MemoryError("moelab native moe_block: out of memory for its buffers")
    return out, idx


class LayerTable:
    """The layers `decode_layers` runs — each its attention and MoE blocks' arguments (one dtype) and its cache
    buffers, set by `set_cache` — as one C array, kept from step to step."""

    def __init__(self, blocks: list[tuple[BlockArgs, BlockArgs]]) -> None:
        if not isinstance(blocks, list) or not all(isinstance(b, tuple) and len(b) == 2 for b in blocks):
            raise ValueError("decode_layers: blocks must be a list of (attention BlockArgs, MoE BlockArgs)")
        for attn, moe in blocks:
            _check_args(attn, _AttnArgs)
            _check_args(moe, _MoEArgs)
        first = blocks[0][0] if blocks else None
        if not blocks or any((a.dtype, m.dtype, a.struct.rot) != (first.dtype, first.dtype, first.struct.rot)
                             for a, m in blocks):
            raise ValueError("decode_layers: the attention and MoE blocks must take one dtype and one rotary width")
        self.blocks, self.dtype, self.rot, self.n = blocks, first.dtype, first.struct.rot, len(blocks)
        self.array = (_Layer * self.n)()
        for slot, (attn, moe) in zip(self.array, blocks):
            slot.attn, slot.moe = ctypes.addressof(attn.struct), ctypes.addressof(moe.struct)
        self.buffers: list[tuple[Tensor, Tensor] | None] = [None] * self.n
        self.capacity, self.rows = 0, {None}
        self.k = blocks[0][1].struct.k if len({m.struct.k for _, m in blocks}) == 1 else None  # one k: decode_rows

    def set_cache(self, i: int, k_buf: Tensor, v_buf: Tensor) -> None:
        """Layer i's keys and values go to k_buf, v_buf [B, G, capacity, Dh] (kept; B = 1 for `decode_layers`)."""
        if not isinstance(i, int) or not 0 <= i < self.n:
            raise ValueError(f"decode_layers: layer {i!r} is outside the table's {self.n} layers")
        if self.buffers[i] is not None and self.buffers[i][0] is k_buf and self.buffers[i][1] is v_buf:
            return
        _check_cache(self.blocks[i][0], k_buf, v_buf, 0, rows=None)
        slot = self.array[i]
        slot.kbuf, slot.vbuf = k_buf.data_ptr(), v_buf.data_ptr()
        slot.sg, slot.sl, slot.sb = k_buf.stride(1), k_buf.stride(2), k_buf.stride(0)
        self.buffers[i] = (k_buf, v_buf)
        self.capacity = min(b[0].shape[2] if b else 0 for b in self.buffers)
        self.rows = {b[0].shape[0] if b else None for b in self.buffers}


def decode_layers(table: LayerTable, x: Tensor, cos: Tensor, sin: Tensor, L: int,
                  experts: Tensor | None = None) -> Tensor:
    """x after the table's layers — each `attention_block` then `moe_block` — for one token x [1, 1, D] at
    position L, in one call (`cpu_kernels.c`, moelab_decode_layers); each layer's key and value are
    appended at L (every layer's buffers must hold more than L positions). `experts`: an int64 CPU tensor
    [layers, k] (every layer routing to one k) that receives the experts each layer chose."""
    if not isinstance(table, LayerTable):
        raise ValueError(f"moelab native: table must be a LayerTable; got {type(table).__name__}")
    _check_token(table.dtype, x)
    _check_table(table, 1, L)
    cos, sin = _tables(cos, sin, table.rot)
    if experts is not None and (not isinstance(experts, Tensor) or table.k is None or experts.dtype != torch.int64
                                or experts.shape != (table.n, table.k) or experts.device.type != "cpu"
                                or not experts.is_contiguous()):
        raise ValueError(f"decode_layers: experts must be a contiguous CPU int64 tensor [{table.n}, k] (one k)")
    out = x.clone()
    if build.library().moelab_decode_layers(table.array, table.n, out.data_ptr(), cos.data_ptr(), sin.data_ptr(), L,
                                            None if experts is None else experts.data_ptr(),
                                            torch.get_num_threads()):
        raise MemoryError("moelab native decode_layers: out of memory for its buffers")
    return out


def _check_table(table: LayerTable, rows: int | None, L: int) -> None:
    """Every layer's cache buffers set, of `rows` rows (None: one number of rows), holding more than L positions."""
    if any(b is None for b in table.buffers):
        raise ValueError("decode_layers: every layer's cache buffers must be set first (LayerTable.set_cache)")
    if (rows is not None and table.rows != {rows}) or len(table.rows) != 1:
        raise ValueError(f"decode: the cache buffers hold {sorted(table.rows)} rows; the tokens are {rows} rows")
    if not isinstance(L, int) or not 0 <= L < table.capacity:
        raise ValueError(f"decode_layers: position {L} is outside the cache buffers ({table.capacity} positions)")


def _index(name: str, t: Tensor | None, T: int, lo: int | Tensor, hi: int | Tensor) -> Tensor:
    """t as a contiguous CPU int64 tensor [T] with lo <= t <= hi elementwise, else ValueError naming it."""
    if not isinstance(t, Tensor) or t.shape != (T,) or t.dtype != torch.int64 or t.device.type != "cpu" \
            or (T and not (bool((t >= lo).all()) and bool((t <= hi).all()))):
        raise ValueError(f"decode_rows: {name} must be a CPU int64 tensor [{T}] of values in [lo, hi] = "
                         f"[{lo if isinstance(lo, int) else 'start'}, {hi if isinstance(hi, int) else 'positions'}]")
    return t.contiguous()


def decode_rows(table: LayerTable, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                start: Tensor | None = None, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step of T tokens through the table's layers in one call (`cpu_kernels.c`, moelab_decode_rows): x [T, 1, D]
    of the table's dtype; token t is at position positions[t] of cache row rows[t] (None: row t) — its key and value
    are written there — with rotary angles cos[t], sin[t] ([T, rotary_dim]), and attends to that row's keys at
    start[t] .. positions[t] (its left padding before start[t]; None: 0). A decode step of B rows: rows 0..B−1, one
    position; a chunk of a prompt: row 0, consecutive positions. Each token's result is bit-identical to
    `decode_layers` run on it alone in turn. Returns (x after the layers, each token's experts [layers, T, k])."""
    if not isinstance(table, LayerTable):
        raise ValueError(f"moelab native: table must be a LayerTable; got {type(table).__name__}")
    if table.k is None:
        raise ValueError("decode_rows: the table's MoE layers must route to one number of experts k")
    if not isinstance(x, Tensor) or x.device.type != "cpu" or x.dim() != 3 or x.shape[1] != 1 \
            or x.dtype != table.dtype or not x.is_contiguous():
        raise ValueError(f"decode_rows: x must be a contiguous CPU tensor [T, 1, D] of {table.dtype}")
    T = x.shape[0]
    _check_table(table, None, 0)
    (n_rows,) = table.rows
    rows = torch.arange(T) if rows is None else rows
    rows = _index("rows", rows, T, 0, n_rows - 1)
    positions = _index("positions", positions, T, 0, table.capacity - 1)
    start = _index("start", torch.zeros(T, dtype=torch.int64) if start is None else start, T, 0, positions)
    if not all(isinstance(t, Tensor) and t.device.type == "cpu" and t.is_floating_point() for t in (cos, sin)) \
            or cos.shape != (T, table.rot) or sin.shape != cos.shape:
        raise ValueError(f"decode_rows: cos, sin must be floating-point CPU tensors [{T}, {table.rot}]")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out, idx = x.clone(), torch.empty(table.n, T, table.k, dtype=torch.int64)
    if build.library().moelab_decode_rows(table.array, table.n, T, out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                          rows.data_ptr(), positions.data_ptr(), start.data_ptr(), idx.data_ptr(),
                                          torch.get_num_threads()):
        raise MemoryError("moelab native decode_rows: out of memory for its buffers")
    return out, idx
