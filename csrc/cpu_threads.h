// Threads worth using on a busy machine, shared by every C++ CPU kernel of the extension.
//
// load_aware_threads(want): at most the CPUs that other processes' runnable threads leave free
// (the running count of /proc/loadavg, sampled at most every 20 ms; our own `want` threads are
// assumed among the runnable), at least 1. On an oversubscribed machine a parallel region waits
// for descheduled team threads while the others spin, which costs far more than the work it
// shares. VARFORMER_LOAD_AWARE=0 turns this off; Linux only (elsewhere it returns `want`).
//
// run_blocks(nblocks, threads, make, body): the parallel loop those kernels share.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sched.h>

#include <chrono>
#include <cstdio>
#endif

namespace varformer_cpu {

inline int64_t load_aware_threads(int64_t want) {
#if defined(__linux__)
  if (want <= 1) return want;
  const char* env = std::getenv("VARFORMER_LOAD_AWARE");
  if (env != nullptr && env[0] == '0') return want;
  static const int64_t ncpu = [] {
    cpu_set_t set;
    CPU_ZERO(&set);
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? int64_t(CPU_COUNT(&set)) : int64_t(0);
  }();
  if (ncpu <= 0) return want;
  static std::atomic<int64_t> sampled_ms{-1000000}, runnable{0};
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now().time_since_epoch()).count();
  if (now - sampled_ms.load(std::memory_order_relaxed) > 20) {
    if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
      double a, b, c;
      long running = 0, total = 0;
      if (std::fscanf(f, "%lf %lf %lf %ld/%ld", &a, &b, &c, &running, &total) == 5)
        runnable.store(running, std::memory_order_relaxed);
      std::fclose(f);
    }
    sampled_ms.store(now, std::memory_order_relaxed);
  }
  const int64_t others = std::max<int64_t>(0, runnable.load(std::memory_order_relaxed) - want);
  return std::max<int64_t>(1, std::min<int64_t>(want, ncpu - others));
#else
  return want;
#endif
}

// Runs body(block, scratch) for blocks [0, nblocks) on up to `threads` threads of torch's pool
// in one parallel region; blocks are handed out by an atomic counter (a descheduled thread
// delays only the block it holds), scratch is made once per thread.
template <typename S, typename Make, typename F>
void run_blocks(int64_t nblocks, int64_t threads, const Make& make, const F& body) {
  threads = std::min<int64_t>(threads, nblocks);
  if (threads <= 1 || at::in_parallel_region()) {
    S sc = make();
    for (int64_t k = 0; k < nblocks; ++k) body(k, sc);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    S sc = make();
    for (int64_t k = next.fetch_add(1); k < nblocks; k = next.fetch_add(1)) body(k, sc);
  });
}

}  // namespace varformer_cpu
