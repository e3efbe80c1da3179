"""Triton kernels of the project's top-K selection: the GPU routes of ``megatron_qsparse.sparsity.topk``.

Every function here equals a torch definition bit for bit (``topk_mask_torch``, ``kth_largest``,
``select_by_threshold``, and the candidate step of ``parallel.sharded_topk``): tested in the interpreter
(``tests/unit/test_triton_select.py``).

The rule. A row's entries are ranked by ``|x|`` in fp32. The k-th largest magnitude is the threshold (NaN ranks
above everything, as ``torch.topk`` / ``kthvalue`` rank it); every ``|x| > threshold`` is kept, then the entries
equal to it from the lowest index up, k in all. Comparisons are IEEE: a NaN is never kept, a NaN threshold keeps
nothing (``select.h`` explains why this is what the torch route does).

Keys. ``|x|`` in fp32 read as an int32 (the sign bit cleared) orders exactly like the magnitudes, with every NaN
above +inf (``0x7F800000``). The selection works on these keys only, in integer compares: no float compare is
ever flushed to zero, and fp32 subnormals rank as they should.

Selection without a sort (a bit-by-bit radix select). The k-th largest key is the largest value ``t`` with
``count(key >= t) >= k``. It is built from the top bit down: with the bits above ``b`` known (``lo``), one
reduction counts ``key >= lo | 1 << b``; where at least k entries reach it, bit b is set. Thirty-one passes give
every bit of an fp32 key; bf16 and fp16 magnitudes have their low 16 (13) fp32 bits zero, so their passes stop
there (15 or 18 passes). A long row leaves the loop early when a count equals k exactly: the k-th key is then
the smallest key reaching the candidate, one min-reduction away (random fp32 rows of 4096-14336 entries stop
after about 20 passes). The same min-reduction closes the normal exit (the smallest key >= the k-th key is the
k-th key), so both exits end the same way. A pass over a row held in registers costs about three instructions
per entry (compare, convert, add) and one block reduction, and no memory traffic: the row is read once.

Mask. Each entry becomes a code (ABOVE the threshold and not NaN, TIE, or 0), so that only one int32 per entry
stays live through the scan; ``greater`` = the ABOVE count, ``ties_needed = k - greater``; a running ``cumsum`` of
the TIE codes numbers the ties in position order, and a tie is kept while its number (plus ``ties_before``, the
ties on lower tensor-parallel ranks) is at most ``ties_needed``. The mask is written as one byte per entry into
the ``torch.bool`` output through a ``uint8`` view.

Layout. One program owns ``ROWS`` rows of ``BLOCK`` (the next power of two of the row size) entries held in
registers: one row for long rows (up to ``max_block`` = 16384 entries: 16 warps, 32 entries a thread), several
for short ones (the blocks of N:M sparsity are rows of ``block_size`` entries of a contiguous tensor: a tile of
2048 entries, every reduction along the row axis, every bit decided). Rows longer than ``max_block`` take a
second kernel, one program per row, that loops over chunks of 4096 entries (``max_block`` where smaller) and
re-reads the row (from L1/L2) in every pass; tests pass a small ``max_block`` to exercise it. Compiled for sm_90
(ptxas), the in-register kernels of a 16384-entry bf16 row use about 90 registers a thread and no spills. No
function synchronises with the host: k is a Python int, every per-row quantity stays on the device.

``topk_values`` (the candidates a tensor-parallel rank proposes) writes, per row, the magnitudes ranked strictly
above the k-th key in row order, then the k-th magnitude repeated up to k values (a multiset equal to
``torch.topk(x.abs().float(), k, sorted=False).values``, NaNs included).
"""

import contextlib

import torch
import triton
import triton.language as tl

MAX_BLOCK = 16384  # longest row held in registers
LONG_ROW_CHUNK = 4096  # longer rows: processed in chunks of this size (or of max_block where smaller)
TILE = 2048  # entries per program when several short rows share one
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32 bits below this are zero in every magnitude of the dtype: the radix select stops there
LOWEST_BIT = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}

MODE_MASK: tl.constexpr = tl.constexpr(0)  # topk_mask, block_topk_mask
MODE_KTH: tl.constexpr = tl.constexpr(1)  # kth_and_greater
MODE_THRESHOLD: tl.constexpr = tl.constexpr(2)  # threshold_mask
MODE_VALUES: tl.constexpr = tl.constexpr(3)  # topk_values

INF_KEY: tl.constexpr = tl.constexpr(0x7F800000)  # keys above this are NaN
MAX_KEY: tl.constexpr = tl.constexpr(0x7FFFFFFF)
PAD_KEY: tl.constexpr = tl.constexpr(-2)  # lanes past the row: below every key and every threshold key
TOP_BIT: tl.constexpr = tl.constexpr(30)  # highest bit of a magnitude key
TIE: tl.constexpr = tl.constexpr(1)  # an entry equal to the threshold (the codes of ``_codes``)
ABOVE: tl.constexpr = tl.constexpr(2)  # an entry above it, not NaN


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _magnitude_keys(x_ptrs, valid):
    """|x| in fp32 as int32 bits (ordered like the magnitudes, NaN above inf); PAD_KEY off the row."""
    x = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32)
    keys = x.to(tl.int32, bitcast=True) & MAX_KEY
    return tl.where(valid, keys, PAD_KEY)


@triton.jit
def _as_float(keys):
    return keys.to(tl.float32, bitcast=True)


@triton.jit
def _threshold_key(kth):
    """The key whose integer compares with magnitude keys give IEEE ``mag > kth`` / ``mag == kth``: kth's own bits
    when it is >= +0 or NaN, 0 for -0.0, -1 below (every magnitude is greater, none equal)."""
    bits = kth.to(tl.int32, bitcast=True)
    magnitude = bits & MAX_KEY
    negative_number = (bits < 0) & (magnitude <= INF_KEY)
    return tl.where(negative_number, tl.where(magnitude == 0, 0, -1), bits)


@triton.jit
def _tie_budget(ties_needed, ties_before, D):
    """How many of a row's own ties this shard may keep: ties_needed - ties_before, clamped into int32."""
    return tl.minimum(tl.maximum(ties_needed - ties_before, -1), D).to(tl.int32)


@triton.jit
def _codes(keys, threshold):
    """Each entry against the threshold, IEEE as ``mag > kth`` / ``mag == kth``: ABOVE, TIE, or 0 (below, a NaN,
    or any entry when the threshold is NaN). One int32 per entry: the keys need not stay live through the scan."""
    numeric = (keys <= INF_KEY) & (threshold <= INF_KEY)
    return tl.where(numeric, tl.where(keys == threshold, TIE, tl.where(keys > threshold, ABOVE, 0)), 0)


@triton.jit
def _keep(codes, budget, axis: tl.constexpr):
    """select_by_threshold from the codes: every ABOVE, and the ties while their number is within ``budget``."""
    tie_number = tl.cumsum(codes & TIE, axis=axis)
    return (codes == ABOVE) | ((codes == TIE) & (tie_number <= budget))


# ---------------------------------------------------------------------------------------------------------------
# Rows held in registers: a tile of ROWS rows of BLOCK entries


@triton.jit
def _tile_kth_key(keys, k, ROWS: tl.constexpr, LOW_BIT: tl.constexpr):
    """The k-th largest key of every row of ``keys`` [ROWS, BLOCK] (bit-by-bit radix select)."""
    lo = tl.zeros([ROWS], dtype=tl.int32)
    if ROWS == 1:  # a long row: stop as soon as exactly k keys reach the candidate
        bit = tl.full([], TOP_BIT, tl.int32)
        while bit >= LOW_BIT:
            candidate = lo | (1 << bit)
            reaching = tl.sum((keys >= candidate[:, None]).to(tl.int32), axis=1)
            lo = tl.where(reaching >= k, candidate, lo)
            bit = tl.where(tl.max(reaching, axis=0) == k, -1, bit - 1)
    else:  # short rows (blocks): they seldom all stop early, so every bit is decided
        for bit in tl.static_range(TOP_BIT, LOW_BIT - 1, -1):
            candidate = lo | (1 << bit)
            reaching = tl.sum((keys >= candidate[:, None]).to(tl.int32), axis=1)
            lo = tl.where(reaching >= k, candidate, lo)
    # the least key reaching lo: lo itself when every bit was decided, the k-th key when exactly k reached it
    return tl.min(tl.where(keys >= lo[:, None], keys, MAX_KEY), axis=1)


@triton.jit
def _select_rows_kernel(
    x_ptr,
    kth_ptr,
    need_ptr,
    before_ptr,
    out_ptr,
    greater_ptr,
    n_rows,
    D,
    k,
    MODE: tl.constexpr,
    HAS_BEFORE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    LOW_BIT: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    in_rows = rows < n_rows
    valid = in_rows[:, None] & (cols[None, :] < D)
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    keys = _magnitude_keys(x_ptr + offsets, valid)

    if MODE == MODE_THRESHOLD:
        threshold = _threshold_key(tl.load(kth_ptr + rows, mask=in_rows, other=0.0))
        before = tl.zeros([ROWS], dtype=tl.int64)
        if HAS_BEFORE:
            before = tl.load(before_ptr + rows, mask=in_rows, other=0)
        budget = _tie_budget(tl.load(need_ptr + rows, mask=in_rows, other=0), before, D)
        keep = _keep(_codes(keys, threshold[:, None]), budget[:, None], 1)
        tl.store(out_ptr + offsets, keep.to(tl.uint8), mask=valid)
    else:
        kth = _tile_kth_key(keys, k, ROWS, LOW_BIT)
        if MODE == MODE_VALUES:
            # the keys strictly above the k-th (NaNs included) in row order, then the k-th up to k values
            above = tl.where(keys > kth[:, None], keys, -1)  # one int32 per entry live through the scan
            is_above = 1 + (above >> 31)  # 1 above, 0 not (arithmetic: no predicate kept live)
            slot = tl.cumsum(is_above, axis=1) - 1
            out_rows = out_ptr + rows.to(tl.int64)[:, None] * k
            tl.store(out_rows + slot, _as_float(above), mask=above >= 0)
            n_above = tl.sum(is_above, axis=1)
            fill = in_rows[:, None] & (cols[None, :] >= n_above[:, None]) & (cols[None, :] < k)
            tl.store(out_rows + cols[None, :], tl.broadcast_to(_as_float(kth)[:, None], [ROWS, BLOCK]), mask=fill)
        else:
            codes = _codes(keys, kth[:, None])
            greater = tl.sum((codes == ABOVE).to(tl.int32), axis=1)
            if MODE == MODE_KTH:
                tl.store(out_ptr + rows, _as_float(kth), mask=in_rows)
                tl.store(greater_ptr + rows, greater.to(tl.int64), mask=in_rows)
            else:
                keep = _keep(codes, (k - greater)[:, None], 1)
                tl.store(out_ptr + offsets, keep.to(tl.uint8), mask=valid)


# ---------------------------------------------------------------------------------------------------------------
# Rows longer than max_block: one program per row, loops over chunks of CHUNK entries


@triton.jit
def _chunk_keys(row_ptr, start, D, CHUNK: tl.constexpr):
    cols = start + tl.arange(0, CHUNK)
    return _magnitude_keys(row_ptr + cols, cols < D)


@triton.jit
def _long_row_count_reaching(row_ptr, D, candidate, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    reaching = 0
    for start in range(0, NUM_CHUNKS * CHUNK, CHUNK):
        reaching += tl.sum((_chunk_keys(row_ptr, start, D, CHUNK) >= candidate).to(tl.int32), axis=0)
    return reaching


@triton.jit
def _long_row_kth_key(row_ptr, D, k, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, LOW_BIT: tl.constexpr):
    """The k-th largest key of one row, as in ``_tile_kth_key``, one pass over the row per bit."""
    lo = tl.full([], 0, tl.int32)
    bit = tl.full([], TOP_BIT, tl.int32)
    while bit >= LOW_BIT:
        candidate = lo | (1 << bit)
        reaching = _long_row_count_reaching(row_ptr, D, candidate, CHUNK, NUM_CHUNKS)
        lo = tl.where(reaching >= k, candidate, lo)
        bit = tl.where(reaching == k, -1, bit - 1)  # exactly k reach it: the k-th key is the least of them
    kth = MAX_KEY
    for start in range(0, NUM_CHUNKS * CHUNK, CHUNK):
        keys = _chunk_keys(row_ptr, start, D, CHUNK)
        kth = tl.minimum(kth, tl.min(tl.where(keys >= lo, keys, MAX_KEY), axis=0))
    return kth


@triton.jit
def _long_row_mask(row_ptr, out_row, D, threshold, budget, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """select_by_threshold over the chunks of one row; the tie numbers run on across chunks."""
    ties_seen = 0
    for start in range(0, NUM_CHUNKS * CHUNK, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        keys = _magnitude_keys(row_ptr + cols, cols < D)
        codes = _codes(keys, threshold)
        tl.store(out_row + cols, _keep(codes, budget - ties_seen, 0).to(tl.uint8), mask=cols < D)
        ties_seen += tl.sum(codes & TIE, axis=0)


@triton.jit
def _long_row_values(
    row_ptr, out_row, D, k, kth, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, FILL_CHUNKS: tl.constexpr
):
    n_above = 0
    for start in range(0, NUM_CHUNKS * CHUNK, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        keys = _magnitude_keys(row_ptr + cols, cols < D)
        above = tl.where(keys > kth, keys, -1)
        is_above = 1 + (above >> 31)
        slot = n_above + tl.cumsum(is_above, axis=0) - 1
        tl.store(out_row + slot, _as_float(above), mask=above >= 0)
        n_above += tl.sum(is_above, axis=0)
    for start in range(0, FILL_CHUNKS * CHUNK, CHUNK):
        cols = start + tl.arange(0, CHUNK)
        fill = (cols >= n_above) & (cols < k)
        tl.store(out_row + cols, tl.full([CHUNK], 0, tl.float32) + _as_float(kth), mask=fill)


@triton.jit
def _select_long_rows_kernel(
    x_ptr,
    kth_ptr,
    need_ptr,
    before_ptr,
    out_ptr,
    greater_ptr,
    D,
    k,
    MODE: tl.constexpr,
    HAS_BEFORE: tl.constexpr,
    CHUNK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    FILL_CHUNKS: tl.constexpr,
    LOW_BIT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * D
    if MODE == MODE_THRESHOLD:
        threshold = _threshold_key(tl.load(kth_ptr + row))
        before = tl.full([], 0, tl.int64)
        if HAS_BEFORE:
            before = tl.load(before_ptr + row)
        budget = _tie_budget(tl.load(need_ptr + row), before, D)
        _long_row_mask(row_ptr, out_ptr + row * D, D, threshold, budget, CHUNK, NUM_CHUNKS)
    else:
        kth = _long_row_kth_key(row_ptr, D, k, CHUNK, NUM_CHUNKS, LOW_BIT)
        if MODE == MODE_VALUES:
            _long_row_values(row_ptr, out_ptr + row * k, D, k, kth, CHUNK, NUM_CHUNKS, FILL_CHUNKS)
        else:
            greater = 0
            for start in range(0, NUM_CHUNKS * CHUNK, CHUNK):
                keys = _chunk_keys(row_ptr, start, D, CHUNK)
                greater += tl.sum((_codes(keys, kth) == ABOVE).to(tl.int32), axis=0)
            if MODE == MODE_KTH:
                tl.store(out_ptr + row, _as_float(kth))
                tl.store(greater_ptr + row, greater.to(tl.int64))
            else:
                _long_row_mask(row_ptr, out_ptr + row * D, D, kth, k - greater, CHUNK, NUM_CHUNKS)


# ---------------------------------------------------------------------------------------------------------------
# Launch


def _check_max_block(max_block: int) -> int:
    if max_block < 16 or max_block & (max_block - 1):
        raise ValueError(f"max_block={max_block} must be a power of two >= 16")
    return max_block


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous [rows, D] tensor (the row = the last dim)."""
    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton selection reads fp32, bf16 or fp16, not {x.dtype}")
    if x.dim() == 0:
        raise ValueError("the Triton selection needs at least one dim (the row)")
    return x.contiguous().reshape(-1, x.shape[-1])


def _warps(entries: int) -> int:
    return max(1, min(16, entries // 512))


def _on_device_of(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), nothing to do on CPU (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _launch(mode, rows, k, out, **kw):
    """Run the selection kernel of ``mode`` over the rows of ``rows`` [n, D] (n > 0), on their device."""
    with _on_device_of(rows):
        _launch_here(mode, rows, k, out, **kw)


def _launch_here(mode, rows, k, out, *, greater=None, kth=None, need=None, before=None, max_block=MAX_BLOCK):
    n_rows, size = rows.shape
    spare = out  # a pointer argument the mode does not read or write
    args = (
        rows,
        spare if kth is None else kth,
        spare if need is None else need,
        spare if before is None else before,
        out,
        spare if greater is None else greater,
    )
    low_bit = LOWEST_BIT[rows.dtype]
    if size > _check_max_block(max_block):
        chunk = min(max_block, LONG_ROW_CHUNK)
        _select_long_rows_kernel[(n_rows,)](
            *args, size, k, MODE=mode, HAS_BEFORE=before is not None, CHUNK=chunk,
            NUM_CHUNKS=triton.cdiv(size, chunk), FILL_CHUNKS=triton.cdiv(k, chunk), LOW_BIT=low_bit,
            num_warps=_warps(chunk),
        )  # fmt: skip
        return
    block = triton.next_power_of_2(size)
    per_program = max(1, min(TILE // block, triton.next_power_of_2(n_rows)))
    _select_rows_kernel[(triton.cdiv(n_rows, per_program),)](
        *args, n_rows, size, k, MODE=mode, HAS_BEFORE=before is not None, ROWS=per_program, BLOCK=block,
        LOW_BIT=low_bit, num_warps=_warps(per_program * block),
    )  # fmt: skip


def _check_k(k: int, size: int) -> None:
    if not 0 < k <= size:
        raise ValueError(f"k={k} must lie in (0, {size}] (the row size)")


def _mask_of(x: torch.Tensor, k: int, max_block: int, segment: int) -> torch.Tensor:
    """The top-k mask of every ``segment`` consecutive entries of ``x``'s rows (segment divides the row)."""
    if k >= segment or x.numel() == 0:
        return torch.full(x.shape, k > 0, dtype=torch.bool, device=x.device)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    rows = _rows_of(x).reshape(-1, segment)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    _launch(MODE_MASK.value, rows, k, mask.view(torch.uint8), max_block=max_block)
    return mask


def _per_row(t, x: torch.Tensor, dtype) -> torch.Tensor:
    """A [..., 1] per-row quantity (tensor or number) as a flat contiguous tensor of ``dtype`` on x's device,
    broadcast over x's leading dims."""
    t = torch.as_tensor(t, device=x.device)
    return torch.broadcast_to(t, (*x.shape[:-1], 1)).reshape(-1).to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# The routes (megatron_qsparse.kernels.triton_routes.ROUTES)


def topk_mask(x: torch.Tensor, k: int, *, max_block: int = MAX_BLOCK) -> torch.Tensor:
    """``topk_mask_torch(x, k)``: exactly the k largest |x| of each row, lower index first on ties; all True for
    k >= D, all False for k <= 0."""
    return _mask_of(x, k, max_block, x.shape[-1])


def block_topk_mask(x: torch.Tensor, keep: int, block_size: int, *, max_block: int = MAX_BLOCK) -> torch.Tensor:
    """N:M mask: ``keep`` of every ``block_size`` consecutive entries of the row, lower index first on ties."""
    size = x.shape[-1]
    if block_size <= 0 or size % block_size:
        raise ValueError(f"block sparsity needs the row size ({size}) to be a multiple of block_size ({block_size})")
    return _mask_of(x, keep, max_block, block_size)


def kth_and_greater(x: torch.Tensor, k: int, *, max_block: int = MAX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(kth, greater): the k-th largest |x| of each row in fp32 [..., 1] (``kth_largest``: NaN ranks above
    everything) and ``(|x| > kth).sum(-1, keepdim=True)`` as int64 (IEEE: a NaN is never greater)."""
    size = x.shape[-1]
    _check_k(k, size)
    kth = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    greater = torch.empty((*x.shape[:-1], 1), dtype=torch.int64, device=x.device)
    if kth.numel():
        _launch(MODE_KTH.value, _rows_of(x), k, kth, greater=greater, max_block=max_block)
    return kth, greater


def threshold_mask(
    x: torch.Tensor,
    kth: torch.Tensor,
    ties_needed: torch.Tensor,
    ties_before: torch.Tensor | None = None,
    *,
    max_block: int = MAX_BLOCK,
) -> torch.Tensor:
    """``select_by_threshold(|x| in fp32, kth, ties_needed, ties_before)``: |x| > kth, plus the entries equal to kth
    while their position among the row's ties, plus ``ties_before``, is at most ``ties_needed``."""
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    if not mask.numel():
        return mask
    _launch(
        MODE_THRESHOLD.value,
        _rows_of(x),
        0,
        mask.view(torch.uint8),
        kth=_per_row(kth, x, torch.float32),
        need=_per_row(ties_needed, x, torch.int64),
        before=None if ties_before is None else _per_row(ties_before, x, torch.int64),
        max_block=max_block,
    )
    return mask


def topk_values(x: torch.Tensor, k: int, *, max_block: int = MAX_BLOCK) -> torch.Tensor:
    """The k largest |x| of each row in fp32 [..., k], NaN above everything: as a multiset
    ``torch.topk(x.abs().float(), k, sorted=False).values``. Order: the values above the k-th in row order, then
    the k-th value repeated to fill the k slots."""
    _check_k(k, x.shape[-1])
    values = torch.empty((*x.shape[:-1], k), dtype=torch.float32, device=x.device)
    if values.numel():
        _launch(MODE_VALUES.value, _rows_of(x), k, values, max_block=max_block)
    return values
