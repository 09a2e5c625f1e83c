// A CPU stand-in for one CUDA thread block, enough to run iqdb's .cu sources without a GPU.
//
// Each CUDA thread is a ucontext fiber on one OS thread. A fiber runs until it reaches a block
// barrier (__syncthreads, __syncthreads_or, __syncthreads_count) or returns; when every fiber is
// at the barrier, the next phase starts. So the semantics are exactly the block's: shared memory
// (`__shared__` becomes `static`) is visible to all threads after a barrier, and nothing else is
// promised. What it checks beyond the arithmetic:
//   * barrier divergence (some threads wait at a barrier that others never reach) is an error;
//   * each phase runs its fibers in an order the caller chooses (forward, reverse, or shuffled
//     by a seed), so a result that depends on the order of threads between two barriers (a race
//     on shared memory) shows up as different outputs for different orders.
// Not covered: warp intrinsics (the sources it runs must not use them), memory-model details
// beyond barriers, and timing. Blocks of a grid run one after another.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <ucontext.h>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// One OS thread runs every fiber in turn, so plain read-modify-write is atomic here.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}

namespace emu {

enum State { kReady, kAtBarrier, kDone };

struct Block {
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<State> state;
  ucontext_t scheduler;
  std::function<void()> body;
  unsigned current = 0;
  long long contributed = 0; // sum of predicates given to the barrier being filled
  long long result = 0;      // that sum, once the barrier completes
};

inline Block* block = nullptr;

inline void fiber_entry() {
  block->body();
  block->state[block->current] = kDone; // returning resumes the scheduler (uc_link)
}

inline long long barrier(int predicate) {
  block->contributed += predicate != 0;
  block->state[block->current] = kAtBarrier;
  swapcontext(&block->ctx[block->current], &block->scheduler);
  return block->result;
}

// Runs `body` as one block of `threads` threads. order: 0 forward, 1 reverse, 2 shuffled (seed).
// Returns 0, or 1 on barrier divergence.
inline int run_block(unsigned threads, const std::function<void()>& body, int order, unsigned seed) {
  Block b;
  b.ctx.resize(threads);
  b.stacks.assign(threads, std::vector<char>(64 * 1024));
  b.state.assign(threads, kReady);
  b.body = body;
  block = &b;
  for (unsigned i = 0; i < threads; ++i) {
    getcontext(&b.ctx[i]);
    b.ctx[i].uc_stack.ss_sp = b.stacks[i].data();
    b.ctx[i].uc_stack.ss_size = b.stacks[i].size();
    b.ctx[i].uc_link = &b.scheduler;
    makecontext(&b.ctx[i], fiber_entry, 0);
  }
  std::vector<unsigned> sequence(threads);
  for (unsigned i = 0; i < threads; ++i) sequence[i] = order == 1 ? threads - 1 - i : i;
  std::mt19937 rng(seed);
  int status = 0;
  for (;;) {
    if (order == 2) std::shuffle(sequence.begin(), sequence.end(), rng);
    for (unsigned i : sequence) {
      if (b.state[i] != kReady) continue;
      b.current = i;
      threadIdx.x = i;
      swapcontext(&b.scheduler, &b.ctx[i]);
    }
    unsigned waiting = 0, done = 0;
    for (State s : b.state) {
      waiting += s == kAtBarrier;
      done += s == kDone;
    }
    if (done == threads) break;
    if (waiting != threads) { // some returned while others wait: a divergent barrier
      status = 1;
      break;
    }
    b.result = b.contributed;
    b.contributed = 0;
    for (State& s : b.state) s = kReady;
  }
  block = nullptr;
  return status;
}

} // namespace emu

inline void __syncthreads() { emu::barrier(0); }
inline int __syncthreads_or(int predicate) { return emu::barrier(predicate) != 0; }
inline int __syncthreads_count(int predicate) { return (int)emu::barrier(predicate); }
