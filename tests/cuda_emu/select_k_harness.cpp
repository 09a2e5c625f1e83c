// kernels/cuda/select_k.cu on the CPU, through the block emulator (see block_emu.h), as a shared
// library for ctypes: emu_select_k(...) launches select_k_<kc> over a 1-D grid of `blocks` blocks
// of 256 threads, with the kernel's own arguments. Returns 0, 1 on barrier divergence, 2 on an
// unknown bucket. Built by tests/test_select_k.py with -DSELECT_K_SOURCE="<path of the .cu>".
#include "block_emu.h"

#include SELECT_K_SOURCE

extern "C" int emu_select_k(int kc, int blocks, int order, unsigned seed, const float* scores,
                            long long score_stride, int n, const u32* allowed,
                            long long allowed_stride, const long long* index,
                            long long index_stride, int k, int chunk, int chunks, float* out_vals,
                            long long* out_idx, long long out_stride) {
  using Kernel = void (*)(const float*, long long, int, const u32*, long long, const long long*,
                          long long, int, int, int, float*, long long*, long long);
  Kernel kernel = nullptr;
  switch (kc) {
    case 32: kernel = select_k_32; break;
    case 64: kernel = select_k_64; break;
    case 128: kernel = select_k_128; break;
    case 256: kernel = select_k_256; break;
    case 512: kernel = select_k_512; break;
    case 1024: kernel = select_k_1024; break;
    case 2048: kernel = select_k_2048; break;
    default: return 2;
  }
  const unsigned threads = iqdb_select::kThreads;
  blockDim.x = threads;
  gridDim.x = (unsigned)blocks;
  for (int b = 0; b < blocks; ++b) {
    blockIdx.x = (unsigned)b;
    const int status = emu::run_block(
        threads,
        [&] {
          kernel(scores, score_stride, n, allowed, allowed_stride, index, index_stride, k, chunk,
                 chunks, out_vals, out_idx, out_stride);
        },
        order, seed + (unsigned)b);
    if (status != 0) return status;
  }
  return 0;
}
