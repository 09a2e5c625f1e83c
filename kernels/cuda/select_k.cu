// Per-row select-k: the k smallest float32 scores of each row, in order, ties by column.
//
// Contract (iqdb.kernels._select.select_k_twin is its executable definition; keep them identical):
//   * Order: ascending by (value, column). -0.0 and +0.0 are equal (IEEE), so they tie and the
//     smaller column comes first. Every NaN (any sign, any payload) ranks after +inf, NaNs among
//     themselves by column.
//   * Columns whose bit in `allowed` is 0, or whose `index` entry is negative, never appear.
//   * out_vals[j] holds the selected score's own bits (-0.0 stays -0.0, NaN payloads are kept);
//     out_idx[j] is its column, or index[row, column] when an index is given.
//   * Fewer than k eligible columns: the tail is padding, value NaN (0x7fc00000), index -1.
//
// Launch: 1-D grid of rows * chunks blocks, kThreads (256) threads each; block b selects from
// columns [part * chunk, min(n, (part + 1) * chunk)) of row b / chunks (part = b % chunks) and
// writes k entries at out[row * out_stride + part * k]. With chunks > 1 the host runs the kernel
// again over the (rows, chunks * k) candidates with index = the previous out_idx: padding carries
// index -1 and is skipped, and ties resolve by candidate position, which equals column order
// among equal values because chunks are in column order and each chunk's list is sorted by
// (value, column). Kernels: select_k_<KC> for KC in {32, ..., 2048} handles 1 <= k <= KC; the
// host handles k > 2048 with a sort (the twin run on the device), so k has no cap below n.
//
// Design (one block per (row, chunk)):
//   * Each score becomes one u64 key, (order-preserving bits of the value) << 32 | column. Keys
//     are unique, so "the k smallest keys" is a set that does not depend on the order in which
//     threads find them: no atomics decide the result, only where candidates are parked.
//   * The block keeps `list`, the KC smallest keys seen so far (sorted), in shared memory, and the
//     threshold thr = list[k - 1]. Threads read kPerThread coalesced scores per round; a key below
//     thr is appended to `buf` through a shared atomic slot counter. Only keys that beat the k-th
//     best so far pass, so on unordered data buf fills rarely (about k * ln(n / k) keys in all).
//   * When a round may leave less than one round of room in buf, flush: bitonic-sort buf, take
//     min(list[i], buf[KC - 1 - i]) (a bitonic sequence holding the KC smallest of both), bitonic
//     merge it into order, refresh thr. Worst case (scores descending along the row) every key
//     passes and the kernel flushes every round: slower, still exact.
//   * Only __syncthreads, __syncthreads_or and shared atomicAdd: no warp intrinsics and no
//     assumptions about warp size, so tests can run this source on the CPU through a block emulator
//     (tests/cuda_emu/), which is how it is checked on machines without a GPU.
//   * Pure integer compares on the key: no float compare can misplace NaN or -0.0, and the result
//     does not depend on fast-math or FTZ flags.

typedef unsigned int u32;
typedef unsigned long long u64;

namespace iqdb_select {

constexpr int kThreads = 256;                 // threads per block (the host launches exactly this)
constexpr int kPerThread = 4;                 // scores per thread per round: loads in flight
constexpr int kRound = kThreads * kPerThread; // columns read per round
constexpr int kBuffer = 2 * kRound;           // candidate slots; a round adds at most kRound
constexpr u64 kEmpty = ~0ull;                 // above every real key (columns are < 2^31)
constexpr u32 kPadBits = 0x7fc00000u;         // the quiet NaN written as padding

// Maps float bits to a u32 whose unsigned order is the contract's value order.
__device__ __forceinline__ u32 order_bits(u32 b) {
  if (b == 0x80000000u) b = 0u;                            // -0.0 ties with +0.0
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu; // every NaN, after +inf (0xff800000)
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);      // negatives reversed, below positives
}

__device__ __forceinline__ u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }

// Sorts a[0, N) ascending (N a power of two). Every thread of the block calls it; ends synced.
template <int N>
__device__ void bitonic_sort(u64* a) {
  for (int size = 2; size <= N; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < N / 2; i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1)); // i-th index whose `stride` bit is clear
        const int hi = lo + stride;
        const bool up = (lo & size) == 0;
        const u64 x = a[lo], y = a[hi];
        if ((x > y) == up) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Sorts a bitonic a[0, N) ascending (the half-cleaner cascade). Ends synced.
template <int N>
__device__ void bitonic_merge(u64* a) {
  for (int stride = N >> 1; stride > 0; stride >>= 1) {
    for (int i = threadIdx.x; i < N / 2; i += kThreads) {
      const int lo = 2 * i - (i & (stride - 1));
      const int hi = lo + stride;
      const u64 x = a[lo], y = a[hi];
      if (x > y) {
        a[lo] = y;
        a[hi] = x;
      }
    }
    __syncthreads();
  }
}

// Folds buf into list (the KC smallest of both, sorted), empties buf, refreshes thr. Ends synced.
template <int KC>
__device__ void flush(u64* list, u64* buf, int k, u64* thr, int* count) {
  bitonic_sort<kBuffer>(buf);
  // list ascending, buf ascending: the elementwise min of list and reversed buf[0, KC) holds the
  // KC smallest of their union (buf[KC:] cannot beat them) and is bitonic.
  for (int i = threadIdx.x; i < KC; i += kThreads) list[i] = min_u64(list[i], buf[KC - 1 - i]);
  __syncthreads();
  bitonic_merge<KC>(list);
  for (int i = threadIdx.x; i < kBuffer; i += kThreads) buf[i] = kEmpty;
  if (threadIdx.x == 0) {
    *thr = list[k - 1]; // kEmpty while fewer than k keys are known: everything passes
    *count = 0;
  }
  __syncthreads();
}

template <int KC>
__device__ void select_k_block(const float* __restrict__ scores, long long score_stride, int n,
                               const u32* __restrict__ allowed, long long allowed_stride,
                               const long long* __restrict__ index, long long index_stride, int k,
                               int chunk, int chunks, float* __restrict__ out_vals,
                               long long* __restrict__ out_idx, long long out_stride) {
  static_assert(KC <= kBuffer, "the fold reads buf[0, KC)");
  __shared__ u64 list[KC];
  __shared__ u64 buf[kBuffer];
  __shared__ u64 thr;
  __shared__ int count;

  const long long row = blockIdx.x / chunks;
  const int part = blockIdx.x % chunks;
  const long long c0 = (long long)part * chunk;
  const long long c1 = c0 + chunk < n ? c0 + chunk : n;
  const float* s = scores + row * score_stride;
  const u32* bits = allowed ? allowed + row * allowed_stride : nullptr;
  const long long* ids = index ? index + row * index_stride : nullptr;

  // Shared memory starts with garbage (and, in the CPU emulator, with the previous block's).
  for (int i = threadIdx.x; i < KC; i += kThreads) list[i] = kEmpty;
  for (int i = threadIdx.x; i < kBuffer; i += kThreads) buf[i] = kEmpty;
  if (threadIdx.x == 0) {
    thr = kEmpty;
    count = 0;
  }
  __syncthreads();

  for (long long base = c0; base < c1; base += kRound) {
    u64 key[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const long long c = base + j * kThreads + threadIdx.x;
      key[j] = kEmpty;
      if (c < c1) {
        const int col = (int)c;
        bool ok = bits == nullptr || ((bits[col >> 5] >> (col & 31)) & 1u) != 0u;
        if (ok && ids != nullptr) ok = ids[col] >= 0;
        if (ok) key[j] = ((u64)order_bits(__float_as_uint(s[col])) << 32) | (u32)col;
      }
    }
    // thr changes only inside flush, between barriers, so this read is race free. Keys are
    // unique, so strict < drops nothing that ties the k-th best.
    const u64 t = thr;
    int last = -1; // the highest slot this thread took (atomicAdd hands out increasing slots)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (key[j] < t) {
        last = atomicAdd(&count, 1);
        buf[last] = key[j];
      }
    }
    // Slots are 0..count-1, so "some thread took a slot >= kBuffer - kRound" is "less than a
    // round of room left"; __syncthreads_or makes that decision uniform (reading `count` after
    // a plain barrier would race with the next round's atomics) and publishes buf.
    if (__syncthreads_or(last >= kBuffer - kRound)) flush<KC>(list, buf, k, &thr, &count);
  }
  // No atomics since the last barrier: every thread reads the same count.
  if (count > 0) flush<KC>(list, buf, k, &thr, &count);

  float* ov = out_vals + row * out_stride + (long long)part * k;
  long long* oi = out_idx + row * out_stride + (long long)part * k;
  for (int j = threadIdx.x; j < k; j += kThreads) {
    const u64 e = list[j];
    if (e == kEmpty) {
      ov[j] = __uint_as_float(kPadBits);
      oi[j] = -1;
    } else {
      const int col = (int)(u32)e;
      ov[j] = s[col]; // the score's own bits, not the key's (-0.0 stays -0.0)
      oi[j] = ids != nullptr ? ids[col] : (long long)col;
    }
  }
}

} // namespace iqdb_select

// One extern "C" symbol per bucket, so cupy.RawModule needs no name expressions and nvcc -cubin
// compiles every bucket. Arguments: scores and its row stride (elements); n columns; allowed
// bitset (nullptr: all; column c is bit c & 31 of word c >> 5) and its row stride in words (0:
// one bitset for every row); index (nullptr: the column) and its row stride (0: shared); k;
// chunk (columns per block) and chunks (blocks per row); outputs and their row stride.
#define IQDB_SELECT_K(KC)                                                                          \
  extern "C" __global__ void __launch_bounds__(256)                                                \
      select_k_##KC(const float* scores, long long score_stride, int n, const u32* allowed,        \
                    long long allowed_stride, const long long* index, long long index_stride,      \
                    int k, int chunk, int chunks, float* out_vals, long long* out_idx,             \
                    long long out_stride) {                                                        \
    iqdb_select::select_k_block<KC>(scores, score_stride, n, allowed, allowed_stride, index,       \
                                    index_stride, k, chunk, chunks, out_vals, out_idx,             \
                                    out_stride);                                                   \
  }

IQDB_SELECT_K(32)
IQDB_SELECT_K(64)
IQDB_SELECT_K(128)
IQDB_SELECT_K(256)
IQDB_SELECT_K(512)
IQDB_SELECT_K(1024)
IQDB_SELECT_K(2048)
