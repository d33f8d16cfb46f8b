"""Expert-cache replays in C: LRU stack distances and the LFU replay, compiled on first use, with fallbacks.

Both are sequential over the accesses. LRU stack distances (Mattson et al. 1970) give every
cache size at once; numpy computes them in O(E·n) (expert_cache.lru_hits), which for large
E is slower than walking a move-to-front list in C. LFU is not a stack algorithm: each cache
size is its own replay, and in Python that costs about 0.3 µs an access, seconds per size
over a layer of a long run. In C each is a few ns an access. The replay of a whole layer
counts per step in C as well (lru_step_hist, lfu_step_hits): no per-access array the size
of the stream is made, which at 25M accesses cost more than the replays. The system C compiler builds
them once into the user's cache directory (a file named by the source's hash) and ctypes
loads it. Without a compiler, or when the build fails, the numpy stack distances and the
Python LFU replay run instead: the same answers (tests compare them), more slowly.

LFU policy: each cached expert has uses since it was loaded and its last access; a miss
evicts the fewest uses, the least recently used of those on a tie; the cache starts empty.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np

_COMMON = r"""
#include <stdint.h>
#include <stdlib.h>

/* LRU stack distances of up to 8 (uint64_t) or 16 (unsigned __int128) ids, held in a register: byte f of R is id
   f's place in the stack (0: the last used), num_ids before its first use; bytes past num_ids hold 127 and never
   move. Using e, at place r (its distance, or num_ids on a first use: the histogram's column), moves every id placed
   above it (below r) down one: per byte, 0x7F + r - place has its high bit set exactly then, and no byte borrows
   from the next. About ten register operations an access, no branch, no memory but the count. */
#define LRU_BYTES(WORD) { \
    WORD ones = 0, R = 0; \
    for (int32_t f = 0; f < (int32_t)sizeof(WORD); f++) { \
        ones |= (WORD)1 << (8 * f); \
        R |= (WORD)(f < num_ids ? num_ids : 127) << (8 * f); \
    } \
    for (int64_t s = 0; s < n_steps; s++) { \
        int64_t *row = hist + s * width; \
        for (int64_t j = 0; j < step_n[s]; j++, i++) { \
            int32_t e = x[i]; \
            int64_t r = (int64_t)((R >> (8 * e)) & 0xFF); \
            row[r]++; \
            R += ((ones * (WORD)(0x7F + r) - R) & (ones << 7)) >> 7; \
            R &= ~((WORD)0xFF << (8 * e)); \
        } \
    } \
}

/* Priority of a slot = uses since loading * big + last access (unique: last accesses differ). */
static void sift_down(int64_t *pri, int64_t *last, int32_t *id_at, int32_t *pos_of, int32_t n, int32_t h) {
    for (;;) {
        int32_t l = 2 * h + 1, r = l + 1, m = h;
        if (l < n && pri[l] < pri[m]) m = l;
        if (r < n && pri[r] < pri[m]) m = r;
        if (m == h) return;
        int64_t p = pri[h]; pri[h] = pri[m]; pri[m] = p;
        p = last[h]; last[h] = last[m]; last[m] = p;
        int32_t e = id_at[h]; id_at[h] = id_at[m]; id_at[m] = e;
        pos_of[id_at[h]] = h; pos_of[id_at[m]] = m;
        h = m;
    }
}

static void sift_up(int64_t *pri, int64_t *last, int32_t *id_at, int32_t *pos_of, int32_t h) {
    while (h > 0) {
        int32_t up = (h - 1) / 2;
        if (pri[up] <= pri[h]) return;
        int64_t p = pri[h]; pri[h] = pri[up]; pri[up] = p;
        p = last[h]; last[h] = last[up]; last[up] = p;
        int32_t e = id_at[h]; id_at[h] = id_at[up]; id_at[up] = e;
        pos_of[id_at[h]] = h; pos_of[id_at[up]] = up;
        h = up;
    }
}

"""

# Written once per id type (ID_T, _ID): int16 ids are read as they are stored, int32 beyond.
_TYPED = r"""/* LFU over slots: small caches find the victim by a linear scan (no work on a hit), large ones keep a min-heap. */
/* Hits go to hits[i] per access, or else to step_hits[s] per step (step_n[s] accesses each, in order). */
static void replay_ID(const ID_T *x, int64_t n, int32_t size, uint8_t *hits, const int64_t *step_n, int64_t *step_hits,
                   int32_t *pos_of, int32_t *id_at, int64_t *pri, int64_t *last) {
    int64_t big = n + 1, s = -1, left = 0;
    int32_t filled = 0, heap = size > 8;
    for (int64_t i = 0; i < n; i++) {
        int32_t e = x[i], h = pos_of[e];
        if (!hits) { while (left == 0) left = step_n[++s]; left--; }
        if (h >= 0) {
            if (hits) hits[i] = 1; else step_hits[s]++;
            pri[h] += big + i - last[h];
            last[h] = i;
            if (heap) sift_down(pri, last, id_at, pos_of, filled, h);
            continue;
        }
        if (hits) hits[i] = 0;
        int32_t fresh = filled < size;
        if (fresh) {
            h = filled++;
        } else {
            h = 0;
            if (!heap) for (int32_t s = 1; s < size; s++) if (pri[s] < pri[h]) h = s;
            pos_of[id_at[h]] = -1;
        }
        id_at[h] = e; pos_of[e] = h; pri[h] = big + i; last[h] = i;
        if (heap && fresh) sift_up(pri, last, id_at, pos_of, h);
        else if (heap) sift_down(pri, last, id_at, pos_of, filled, h);
    }
}

static int lfu_ID(const ID_T *x, int64_t n, int32_t num_ids, int32_t size, uint8_t *hits, const int64_t *step_n,
               int64_t *step_hits) {
    int32_t *pos_of = malloc(sizeof(int32_t) * (size_t)num_ids);
    int32_t *id_at = malloc(sizeof(int32_t) * (size_t)size);
    int64_t *pri = malloc(sizeof(int64_t) * (size_t)size);
    int64_t *last = malloc(sizeof(int64_t) * (size_t)size);
    if (!pos_of || !id_at || !pri || !last) { free(pos_of); free(id_at); free(pri); free(last); return -1; }
    for (int32_t e = 0; e < num_ids; e++) pos_of[e] = -1;
    replay_ID(x, n, size, hits, step_n, step_hits, pos_of, id_at, pri, last);
    free(pos_of); free(id_at); free(pri); free(last);
    return 0;
}

/* step_hits[s] += the hits of step s's accesses (step_n[s] of them, in order; they sum to n). */
int lfu_step_hits_ID(const ID_T *x, int64_t n, int32_t num_ids, int32_t size, const int64_t *step_n,
                  int64_t *step_hits) {
    return lfu_ID(x, n, num_ids, size, 0, step_n, step_hits);
}

/* hist[s * (num_ids + 1) + d] += step s's accesses at LRU stack distance d; column num_ids: first accesses. Up to
   16 ids, an id's distance is how many ids were used after its last use (branch-free; at 32 and more the list walk
   below is faster); beyond, the move-to-front list. Returns 0, or -1 without memory. */
int lru_step_hist_ID(const ID_T *x, int64_t n, int32_t num_ids, const int64_t *step_n, int64_t n_steps,
                  int64_t *hist) {
    int64_t width = (int64_t)num_ids + 1, i = 0;
    if (num_ids <= 8) { LRU_BYTES(uint64_t) return 0; }
    if (num_ids <= 16) { LRU_BYTES(unsigned __int128) return 0; }
    int32_t *stack = malloc(sizeof(int32_t) * (size_t)num_ids);
    if (!stack) return -1;
    int32_t depth = 0;
    for (int64_t s = 0; s < n_steps; s++) {
        int64_t *row = hist + s * width;
        for (int64_t j = 0; j < step_n[s]; j++, i++) {
            int32_t e = x[i], d = 0;
            while (d < depth && stack[d] != e) d++;
            if (d == depth) { row[num_ids]++; depth++; } else row[d]++;
            for (int32_t k = d; k > 0; k--) stack[k] = stack[k - 1];
            stack[0] = e;
        }
    }
    free(stack);
    return 0;
}
"""

_INT32_ONLY = r"""/* dist[i]: distinct other ids accessed since id x[i] was last accessed (its LRU stack distance), -1 the first
   time: a move-to-front list walked from the front. Returns 0, or -1 without memory. */
int lru_distances(const int32_t *x, int64_t n, int32_t num_ids, int32_t *dist) {
    int32_t *stack = malloc(sizeof(int32_t) * (size_t)num_ids);
    if (!stack) return -1;
    int32_t depth = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t e = x[i], d = 0;
        while (d < depth && stack[d] != e) d++;
        if (d == depth) { dist[i] = -1; depth++; } else dist[i] = d;
        for (int32_t s = d; s > 0; s--) stack[s] = stack[s - 1];
        stack[0] = e;
    }
    free(stack);
    return 0;
}

/* hits[i] = 1 when access i (an id in 0..num_ids-1) hits an LFU cache of `size`; returns 0, or -1 without memory. */
int lfu_replay(const int32_t *x, int64_t n, int32_t num_ids, int32_t size, uint8_t *hits) {
    return lfu_i32(x, n, num_ids, size, hits, 0, 0);
}

"""

SOURCE = (_COMMON + "".join(_TYPED.replace("ID_T", t).replace("_ID", f"_{n}") for t, n in (("int16_t", "i16"), ("int32_t", "i32")))
          + _INT32_ONLY)

_LOCK = threading.Lock()
_KERNEL: list = []  # [function or None] once tried


def lru_distances(x: np.ndarray, num_ids: int) -> np.ndarray | None:
    """LRU stack distance of each access of ids x (ints in 0..num_ids-1), −1 on a first access; None without the kernel."""
    lib = kernel()
    if lib is None:
        return None
    x = np.ascontiguousarray(x, dtype=np.int32)
    dist = np.empty(len(x), dtype=np.int32)
    if len(x) and lib.lru_distances(x.ctypes.data, len(x), int(num_ids), dist.ctypes.data) != 0:
        return None
    return dist


def lru_step_hist(x: np.ndarray, num_ids: int, step_n: np.ndarray) -> np.ndarray | None:
    """Per step (step_n[s] consecutive accesses each), the accesses at each LRU stack distance 0..num_ids-1, then
    the first accesses (column num_ids); None without the kernel."""
    lib = kernel()
    if lib is None:
        return None
    x, step_n, width = _accesses(x, step_n)
    hist = np.zeros((len(step_n), int(num_ids) + 1), dtype=np.int64)
    if len(x) and getattr(lib, f"lru_step_hist_{width}")(x.ctypes.data, len(x), int(num_ids), step_n.ctypes.data, len(step_n),
                                    hist.ctypes.data) != 0:
        return None
    return hist


def lfu_step_hits(x: np.ndarray, num_ids: int, size: int, step_n: np.ndarray) -> np.ndarray:
    """Hits per step (step_n[s] consecutive accesses each) of an LFU cache of `size` over ids x."""
    x, step_n, width = _accesses(x, step_n)
    lib = kernel()
    if lib is not None and len(x):
        hits = np.zeros(len(step_n), dtype=np.int64)
        replay = getattr(lib, f"lfu_step_hits_{width}")
        if replay(x.ctypes.data, len(x), int(num_ids), int(size), step_n.ctypes.data, hits.ctypes.data) == 0:
            return hits
    if not len(x):
        return np.zeros(len(step_n), dtype=np.int64)
    return np.add.reduceat(lfu_replay(x, num_ids, size).astype(np.int64), np.r_[0, np.cumsum(step_n)[:-1]])


def _accesses(x: np.ndarray, step_n: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Ids as the kernels read them (int16 kept as it is: no copy of a long stream), counts, the kernels' suffix."""
    x = np.asarray(x)
    x = np.ascontiguousarray(x, dtype=np.int16 if x.dtype == np.int16 else np.int32)
    step_n = np.ascontiguousarray(step_n, dtype=np.int64)
    if int(step_n.sum()) != len(x) or (step_n < 1).any():  # the kernels walk steps by these counts
        raise ValueError(f"step counts must be positive and sum to the {len(x)} accesses")
    return x, step_n, "i16" if x.dtype == np.int16 else "i32"


def lfu_replay(x: np.ndarray, num_ids: int, size: int) -> np.ndarray:
    """Hits of an LFU cache of `size` over ids x (ints in 0..num_ids-1), as bools."""
    x = np.ascontiguousarray(x, dtype=np.int32)
    lib = kernel()
    if lib is not None and len(x):
        hits = np.empty(len(x), dtype=np.uint8)
        if lib.lfu_replay(x.ctypes.data, len(x), int(num_ids), int(size), hits.ctypes.data) == 0:
            return hits.view(bool)
    return lfu_replay_python(x.tolist(), num_ids, size)


def lfu_replay_python(xs: list[int], num_ids: int, size: int) -> np.ndarray:
    """The same replay in Python: a slot's priority is uses · big + last access, the smallest is the victim."""
    big = len(xs) + 1
    slot_of = [-1] * num_ids
    holder = [-1] * size
    pri = list(range(-size, 0))  # empty slots first, lowest slot first
    hits = bytearray(len(xs))
    for i, e in enumerate(xs):
        s = slot_of[e]
        if s >= 0:
            hits[i] = 1
            pri[s] = (pri[s] // big + 1) * big + i
        else:
            v = pri.index(min(pri))
            h = holder[v]
            if h >= 0:
                slot_of[h] = -1
            holder[v], slot_of[e], pri[v] = e, v, big + i
    return np.frombuffer(bytes(hits), dtype=bool)


def kernel():
    """The compiled library (lru_distances, lru_step_hist, lfu_replay, lfu_step_hits), or None when it cannot be built here."""
    with _LOCK:
        if not _KERNEL:
            try:
                _KERNEL.append(_load())
            except Exception:  # no compiler, no writable cache, a foreign platform: fall back, never fail
                _KERNEL.append(None)
        return _KERNEL[0]


def _load():
    digest = hashlib.sha256((SOURCE + sys.platform + sysconfig.get_platform()).encode()).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    for folder in _cache_dirs():
        path = folder / f"moescope_cache_{digest}{suffix}"
        if not path.exists() and not _build(folder, path):
            continue
        lib = ctypes.CDLL(str(path))
        lib.lfu_replay.restype = lib.lru_distances.restype = ctypes.c_int
        lib.lfu_replay.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p]
        lib.lru_distances.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
        for width in ("i16", "i32"):
            steps, hist = getattr(lib, f"lfu_step_hits_{width}"), getattr(lib, f"lru_step_hist_{width}")
            steps.restype = hist.restype = ctypes.c_int
            steps.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p,
                              ctypes.c_void_p]
            hist.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_void_p]
        return lib
    return None


def _cache_dirs() -> list[Path]:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(base) / "moescope", Path(tempfile.gettempdir()) / f"moescope-{os.getuid() if hasattr(os, 'getuid') else 0}"]


def _build(folder: Path, lib: Path) -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    if not cc or shutil.which(cc[0]) is None:
        cc = ["cc"]
        if shutil.which("cc") is None:
            return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, out = Path(tmp) / "cache.c", Path(tmp) / lib.name
            src.write_text(SOURCE)
            done = subprocess.run([*cc, "-O3", "-shared", "-fPIC", "-o", str(out), str(src)], capture_output=True,
                                  timeout=120, check=False)
            if done.returncode != 0 or not out.exists():
                return False
            os.replace(out, lib)  # atomic: a concurrent build leaves one whole file
        return True
    except (OSError, subprocess.SubprocessError):
        return False
