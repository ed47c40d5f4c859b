"""The page pool that the write-gated caches' global stores draw from, and its allocator.

The admitted tokens of every (layer, batch row, KV head) live in pages of P token slots drawn from one
pool: pool_k, pool_v (N + 1, P, D) and pool_g (N + 1, P). A head's row of page_table (B, Hkv, M) lists its
pages in order: its store slot s is pool row page_table[s // P] * P + s % P, global_len (B, Hkv) says how
many slots hold a token, and it holds ceil(len / P) pages, none of them empty. The per-head capacity is
C = M * P. Page N is scratch: it is never handed out, unused table entries point at it, and the writes of
heads that write nothing go there, so that every write is unconditional and no two heads write the same
row. free_pages (N + 1,) is a stack whose first n_free (1,) entries are the free pages (its last entry is
scratch as well).

With summaries (selection, DESIGN.md's Selection), kmin and kmax (N + 1, D) hold each page's elementwise min
and max over the keys of its filled slots. A page's summary is recomputed from its keys (summarize_pages)
whenever one of its slots is written or moved, so it is exact after any path; a page given back to the free
stack keeps stale values until it is written again, and nothing reads a page its head does not hold.
"""
import torch
import torch.nn as nn
from torch import Tensor

# One compiled decode step for every cache size (--max-seq-len): the size dims of the caches' and the pool's
# buffers are marked dynamic (dynamic_sizes), which torch.compile honours for module buffers only with this
# flag off (it treats buffers as parameters, whose shapes it otherwise fixes). Parameters keep their static
# shapes: nothing marks them dynamic and they never change size.
torch._dynamo.config.force_parameter_static_shapes = False


# Marked only where torch reuses a block's compiled region (model.py's nested_compile_region) for layers whose
# buffers each bring a size symbol of their own: torch 2.11 matches the layers' calls by their graphs, which
# differ in those symbols, so it compiled the block once per layer; 2.13 matches them by their guards. On
# older torch the sizes stay static: the block compiles once, and another cache size compiles the step again.
DYNAMIC_CACHE_SIZES = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


def dynamic_sizes(*dims: tuple[Tensor, int]) -> None:
    """Mark the (buffer, dim) pairs dynamic for torch.compile (where DYNAMIC_CACHE_SIZES); a size of 0 or 1 may
    still be specialised."""
    for tensor, dim in dims if DYNAMIC_CACHE_SIZES else ():
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def pages_for(tokens: int | Tensor, page_size: int) -> int | Tensor:
    """Pages that hold `tokens` tokens, ceil(tokens / page_size): of an int, or of each element of an integer tensor."""
    return -(-tokens // page_size)


class PagePool(nn.Module):
    """Pages of `page_size` token slots that the global stores of every layer, batch row and KV head draw from.

    One pool per model, shared by the layers' WriteGatedCaches: a head takes a page when its last one is
    full, so memory follows what the gate admits, head by head, instead of a worst case per head. Page
    n_pages is scratch (see above); the free stack and its count live on the device.
    """

    def __init__(self, n_pages: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 summaries: bool = False):
        super().__init__()
        if n_pages < 0 or page_size < 1:
            raise ValueError(f"a page pool needs n_pages >= 0 and page_size >= 1, not {n_pages} and {page_size}")
        self.page_size = page_size
        N, P, D = n_pages, page_size, head_dim
        self.register_buffer("k", torch.zeros(N + 1, P, D, dtype=dtype, device=device), persistent=False)        # (N+1, P, D)
        self.register_buffer("v", torch.zeros(N + 1, P, D, dtype=dtype, device=device), persistent=False)        # (N+1, P, D)
        self.register_buffer("g", torch.zeros(N + 1, P, dtype=torch.float32, device=device), persistent=False)   # (N+1, P)
        self.register_buffer("free_pages", torch.empty(N + 1, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("n_free", torch.empty(1, dtype=torch.int64, device=device), persistent=False)
        dynamic_sizes((self.k, 0), (self.v, 0), (self.g, 0), (self.free_pages, 0))
        self.summaries = summaries
        if summaries:
            self.register_buffer("kmin", torch.full((N + 1, D), float("inf"), dtype=dtype, device=device), persistent=False)
            self.register_buffer("kmax", torch.full((N + 1, D), float("-inf"), dtype=dtype, device=device), persistent=False)
            dynamic_sizes((self.kmin, 0), (self.kmax, 0))
        self.reset()

    @property
    def n_pages(self) -> int:
        return self.k.shape[0] - 1

    def reset(self) -> None:
        """Every page free; the stack hands out pages 0, 1, 2... first (any order would do)."""
        self.free_pages.copy_(torch.arange(self.n_pages, -1, -1, device=self.free_pages.device).roll(-1))
        self.n_free.fill_(self.n_pages)

    def bytes_allocated(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def pool_rows(page_table: Tensor, slots: Tensor, page_size: int) -> Tensor:
    """Flat pool rows (page * P + offset) of store slots: page_table (B, Hkv, M), slots (B, Hkv, S) -> (B, Hkv, S)."""
    pages = page_table.gather(2, (slots // page_size).clamp(max=page_table.shape[-1] - 1))
    return pages * page_size + slots % page_size


def summarize_pages(pool: PagePool, page_table: Tensor, global_len: Tensor, columns: Tensor) -> None:
    """Recompute the summaries (kmin, kmax) of the pages at these page-table columns (B, Hkv, J) from their
    filled slots (those below global_len (B, Hkv)), in place, on the device. A column past the table, or one
    whose page holds no token, updates the scratch page instead, so every write is unconditional; a column
    named twice writes the same values twice."""
    P, N, M = pool.page_size, pool.n_pages, page_table.shape[-1]
    held = (columns >= 0) & (columns < M) & (columns * P < global_len[..., None])           # (B, Hkv, J)
    pages = torch.where(held, page_table.gather(2, columns.clamp(0, M - 1)), N)             # (B, Hkv, J)
    filled = columns[..., None] * P + torch.arange(P, device=columns.device) < global_len[..., None, None]  # (B, Hkv, J, P)
    keys = take(pool.k, pages)                                                                # (B, Hkv, J, P, D)
    inf = torch.tensor(float("inf"), dtype=keys.dtype, device=keys.device)
    pool.kmin[pages.flatten()] = torch.where(filled[..., None], keys, inf).amin(3).flatten(0, 2)
    pool.kmax[pages.flatten()] = torch.where(filled[..., None], keys, -inf).amax(3).flatten(0, 2)


def take(x: Tensor, index: Tensor) -> Tensor:
    """x[index], the rows of x at the integer tensor index, written as each path runs it fastest: eager, one
    index_select (on a CPU about 4x faster than advanced indexing: SmolLM2's store at 1k tokens, 36 against
    129 us, 1 thread); compiled, the indexing itself, which Inductor fuses into the loop that reads it (an
    index_select there made the compiled store attention 4x slower)."""
    if torch.compiler.is_compiling():
        return x[index]
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def gather_store(pool: Tensor, page_table: Tensor, n_pages: int) -> Tensor:
    """The first n_pages pages of every head's store: pool (N + 1, P, ...) -> (B, Hkv, n_pages * P, ...)."""
    return take(pool, page_table[:, :, :n_pages]).flatten(2, 3)


def reads_host(x: Tensor) -> bool:
    """Whether reading x on the host is free: run eagerly, on a CPU (a read of host memory, not a device sync). There
    a decode step may read a flag to skip work that would change nothing; compiled, or on a GPU, it never does."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def pages_in_use(global_len: Tensor, page_size: int, n_columns: int, at_least: int = 1) -> int:
    """How many page-table columns (of n_columns) a decode step reads: those of the longest store, at least
    `at_least` (page_size 1: the slots of a contiguous cache, kernels.prefix_attention). Where reading the lengths
    is free or allowed (a CPU, or eager anywhere) it reads them on the host, so that a table sized for the whole
    context costs what the stores hold; torch.compile keeps the count as a symbolic size (kernels.py sets
    capture_scalar_outputs), so one graph serves every length. Compiled on a GPU, where it would be a device sync,
    all n_columns: the masks do the work there, and the Triton kernels skip empty tiles themselves."""
    if not torch.compiler.is_compiling():   # eager: one read of the longest length, then integers
        return max(pages_for(int(global_len.max()), page_size), at_least)
    if global_len.device.type != "cpu":
        return n_columns
    longest = global_len.max()
    n = (longest if page_size == 1 else pages_for(longest, page_size)).clamp(min=at_least).item()
    torch._check(n >= 1)
    torch._check(n >= at_least)
    torch._check(n <= n_columns)
    return n


def grant_pages(free_pages: Tensor, n_free: Tensor, page_table: Tensor, held: Tensor, want: Tensor) -> Tensor:
    """Hand pages from the free stack to the heads that want them, in (batch, head) order, on the device.

    held, want: (B, Hkv) pages each head holds and how many more it wants. The table entries
    [held, held + got) receive the pages; a head asking past its table or past what is left gets fewer.
    Returns got (B, Hkv). No host sync: prefix sums, a gather and a select (run eagerly on a CPU, a grant nobody
    wants, as most of decode's are, returns at once: reads_host).
    """
    if reads_host(want) and not bool(want.any()):
        return torch.zeros_like(held)
    M = page_table.shape[-1]
    want = torch.minimum(want, M - held).flatten()                                          # (B*Hkv,)
    before = (want.cumsum(0) - want).view_as(held)                                          # wanted by earlier heads
    got = (n_free - before).clamp(min=0).minimum(want.view_as(held))                        # (B, Hkv)
    new = torch.arange(M, device=held.device) - held[..., None]                             # (B, Hkv, M) rank among the new pages
    entry = (n_free - 1 - before[..., None] - new).clamp(0, free_pages.shape[0] - 1)         # (B, Hkv, M) stack entries
    page_table.copy_(torch.where((new >= 0) & (new < got[..., None]), free_pages[entry], page_table))
    n_free.sub_(got.sum())
    return got


def release_pages(free_pages: Tensor, n_free: Tensor, page_table: Tensor, global_len: Tensor, page_size: int,
                  keep: Tensor | None = None) -> None:
    """Shorten each head's store to its first keep (B, Hkv) tokens (default: none) and give the pages it no
    longer needs back to the free stack, on the device."""
    N, M = free_pages.shape[0] - 1, page_table.shape[-1]
    keep = torch.zeros_like(global_len) if keep is None else keep
    kept = pages_for(keep, page_size)                                                       # (B, Hkv) pages still needed
    freed = pages_for(global_len, page_size) - kept                                         # (B, Hkv) pages given back
    before = (freed.flatten().cumsum(0) - freed.flatten()).view_as(freed)                   # (B, Hkv)
    col = torch.arange(M, device=keep.device) - kept[..., None]                             # (B, Hkv, M) rank among the freed
    dest = torch.where((col >= 0) & (col < freed[..., None]), n_free + before[..., None] + col, N)   # the rest to scratch
    free_pages.scatter_(0, dest.flatten(), page_table.flatten())
    free_pages[N] = N
    n_free.add_(freed.sum())
    page_table.masked_fill_(col >= 0, N)
    global_len.copy_(keep)


def store_room(free_pages: Tensor, n_free: Tensor, page_table: Tensor, global_len: Tensor, page_size: int,
               wanted: Tensor) -> Tensor:
    """Pages for `wanted` (B, Hkv) more tokens per head; returns the free slots each head then has (B, Hkv)."""
    held = pages_for(global_len, page_size)                                                 # (B, Hkv)
    want = pages_for(global_len + wanted, page_size) - held
    got = grant_pages(free_pages, n_free, page_table, held, want)
    return (held + got) * page_size - global_len
