// Threads for the C++ CPU kernels of the extension, and the block loop they share.
//
// load_aware_threads(want): at most the CPUs that other processes' runnable threads leave free
// (the running count of /proc/loadavg, sampled at most every 20 ms; our own `want` threads are
// assumed among the runnable, and pool helpers spinning for work are not counted), at least 1.
// VARFORMER_LOAD_AWARE=0 turns this off (it returns `want`); Linux only (elsewhere it returns
// `want`).
//
// thread_budget(): the threads a kernel call may ask for (torch's count, or more inside a
// Python `load_aware` section, see set_thread_budget).
//
// run_blocks(nblocks, want, make, body): body(block, scratch) for every block, on up to `want`
// threads taking blocks from a shared counter. Where it runs:
//   - quiet machine (load_aware_threads(want) == want): torch's OpenMP pool (at::parallel_for),
//     whose threads are warm from the ATen ops around our kernels;
//   - busy machine: the calling thread and want - 1 helper threads of the extension's own pool,
//     where the caller waits only for blocks a helper has claimed, never for a helper that has
//     not woken up. An OpenMP region ends in a barrier that waits for every team thread, so on
//     an oversubscribed machine one descheduled thread stalls the whole call for a time slice
//     (earlier versions cut such calls to the free CPUs instead: fewer threads, less share);
//     on a quiet machine the same helpers lose to OpenMP's threads still spinning after the
//     ATen op before (measured in csrc/README.md).
// VARFORMER_CPU_POOL=1 always takes the helper pool, =0 never (OpenMP, cut to the free CPUs when
// busy). Bodies must not call ATen ops (helpers are not OpenMP threads); a body's exception is
// rethrown on the caller once every claimed block has ended.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif

#if defined(__linux__)
#include <sched.h>

#include <chrono>
#include <cstdio>
#endif

namespace varformer_cpu {

namespace detail {
// Helper threads of the pool below spinning for their next job right now: runnable, but ours,
// so load_aware_threads does not count them as other processes' load.
inline std::atomic<int64_t>& helpers_spinning() {
  static std::atomic<int64_t> n{0};
  return n;
}
}  // namespace detail

// Threads a kernel call may ask for: torch's count, or the count set by set_thread_budget while
// a Python `load_aware` section has cut torch's count on a busy machine (the count before the
// cut): ATen's ops then run on the free CPUs, our kernels keep their share on the helper pool.
inline std::atomic<int64_t>& thread_budget_hint() {
  static std::atomic<int64_t> n{0};
  return n;
}
inline int64_t thread_budget() {
  return std::max<int64_t>(at::get_num_threads(),
                           thread_budget_hint().load(std::memory_order_relaxed));
}
// Sets the hint (0: none) and returns the one before.
inline int64_t set_thread_budget(int64_t n) {
  return thread_budget_hint().exchange(std::max<int64_t>(0, n), std::memory_order_relaxed);
}

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
        runnable.store(running - detail::helpers_spinning().load(std::memory_order_relaxed),
                       std::memory_order_relaxed);
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

namespace detail {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// One run_blocks call, shared by the caller and the helpers that join it. `work` runs blocks
// from `first` on until the counter is exhausted. A helper calls it only after claiming a block
// the caller still waits for, so the caller's closures (`ctx`) are alive whenever it runs.
struct Job {
  std::atomic<int64_t> next{0};   // the next unclaimed block
  std::atomic<int64_t> done{0};   // blocks ended (run, or given up after an exception)
  std::atomic<int64_t> seats{0};  // helpers that joined
  int64_t nblocks = 0, helpers = 0;
  void (*work)(void* ctx, Job& job, int64_t first) = nullptr;
  void* ctx = nullptr;
  std::mutex err_mu;
  std::exception_ptr err;

  void help() {
    if (seats.fetch_add(1, std::memory_order_relaxed) >= helpers) return;
    const int64_t k = next.fetch_add(1, std::memory_order_relaxed);
    if (k < nblocks) work(ctx, *this, k);
  }
  void wait() const {   // spin briefly, then yield the CPU (a preempted helper may need it)
    for (int i = 0; done.load(std::memory_order_acquire) < nblocks; ++i) {
      if (i < 4096)
        cpu_relax();
      else
        std::this_thread::yield();
    }
  }
};

template <typename S, typename Make, typename F>
struct Closure {
  const Make& make;
  const F& body;
};

template <typename S, typename Make, typename F>
void work_blocks(void* ctx, Job& job, int64_t k) {
  const auto& c = *static_cast<const Closure<S, Make, F>*>(ctx);
  try {
    S sc = c.make();
    while (true) {
      c.body(k, sc);
      job.done.fetch_add(1, std::memory_order_release);   // publishes the block's writes
      k = job.next.fetch_add(1, std::memory_order_relaxed);
      if (k >= job.nblocks) break;   // from here on only `sc` (ours) and the Job are touched
    }
  } catch (...) {
    {
      std::lock_guard<std::mutex> lk(job.err_mu);
      if (!job.err) job.err = std::current_exception();
    }
    // this block and every block nobody has claimed end here; claimed ones end where they run
    const int64_t first_free = job.next.exchange(job.nblocks, std::memory_order_relaxed);
    job.done.fetch_add(1 + std::max<int64_t>(0, job.nblocks - first_free),
                       std::memory_order_release);
  }
}

// Helper threads (detached, created on first need, never destroyed) that sleep on a condition
// variable between jobs after a short spin. A forked child starts a fresh pool.
class Pool {
 public:
  static Pool& get() {
    static std::once_flag once;
    std::call_once(once, [] {
#if defined(__unix__)
      pthread_atfork(nullptr, nullptr, [] { slot() = new Pool(); });
#endif
      slot() = new Pool();
    });
    return *slot();
  }

  std::mutex busy;   // one caller at a time; a second one runs on OpenMP meanwhile

  void publish(std::shared_ptr<Job> job) {
    std::lock_guard<std::mutex> lk(mu_);
    while (workers_ < job->helpers) {
      const uint64_t seen = gen_.load(std::memory_order_relaxed);
      try {
        std::thread([this, seen] { loop(seen); }).detach();
      } catch (...) {
        break;   // no more threads: the job runs with the helpers there are
      }
      ++workers_;
    }
    job_ = std::move(job);
    gen_.fetch_add(1, std::memory_order_release);
    cv_.notify_all();
  }

 private:
  static Pool*& slot() {
    static Pool* p = nullptr;
    return p;
  }

  void loop(uint64_t seen) {
    for (;;) {
      detail::helpers_spinning().fetch_add(1, std::memory_order_relaxed);
      for (int i = 0; i < 2048 && gen_.load(std::memory_order_acquire) == seen; ++i) cpu_relax();
      detail::helpers_spinning().fetch_sub(1, std::memory_order_relaxed);
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
        seen = gen_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job) job->help();
    }
  }

  std::mutex mu_;   // guards job_ and workers_, and the condition variable's wait
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> gen_{0};
  int64_t workers_ = 0;
};

enum class PoolMode { kAuto, kAlways, kNever };

inline PoolMode pool_mode() {
  const char* env = std::getenv("VARFORMER_CPU_POOL");
  if (env == nullptr || env[0] == '\0') return PoolMode::kAuto;
  return env[0] == '0' ? PoolMode::kNever : env[0] == '1' ? PoolMode::kAlways : PoolMode::kAuto;
}

// The helper pool's run of `threads` threads; false if another caller holds the pool.
template <typename S, typename Make, typename F>
bool run_on_pool(int64_t nblocks, int64_t threads, const Make& make, const F& body) {
  Pool& pool = Pool::get();
  std::unique_lock<std::mutex> busy(pool.busy, std::try_to_lock);
  if (!busy.owns_lock()) return false;
  const Closure<S, Make, F> closure{make, body};
  auto job = std::make_shared<Job>();
  job->nblocks = nblocks;
  job->helpers = threads - 1;
  job->work = &work_blocks<S, Make, F>;
  job->ctx = const_cast<void*>(static_cast<const void*>(&closure));
  pool.publish(job);
  const int64_t k = job->next.fetch_add(1, std::memory_order_relaxed);
  if (k < nblocks) work_blocks<S, Make, F>(job->ctx, *job, k);
  job->wait();
  if (job->err) std::rethrow_exception(job->err);
  return true;
}

}  // namespace detail

// Runs body(block, scratch) for blocks [0, nblocks) on up to `want` threads (see the top of this
// file for where); scratch is made once per thread that takes part.
template <typename S, typename Make, typename F>
void run_blocks(int64_t nblocks, int64_t want, const Make& make, const F& body) {
  int64_t threads = std::min<int64_t>(want, nblocks);
  if (threads > 1 && !at::in_parallel_region()) {
    const detail::PoolMode mode = detail::pool_mode();
    const int64_t free = load_aware_threads(threads);
    if (mode == detail::PoolMode::kAlways ||
        (mode == detail::PoolMode::kAuto && free < threads)) {
      if (detail::run_on_pool<S>(nblocks, threads, make, body)) return;
    }
    threads = free;   // OpenMP: on a busy machine only the CPUs left free
  }
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

// run_blocks over the index range [0, n) cut into blocks of about `grain` (at least 1):
// body(i0, i1) per block, no scratch.
template <typename F>
void run_range(int64_t n, int64_t grain, int64_t want, const F& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t nb = (n + grain - 1) / grain;
  struct None {};
  run_blocks<None>(nb, want, [] { return None{}; }, [&](int64_t b, None&) {
    body(b * grain, std::min(n, (b + 1) * grain));
  });
}

}  // namespace varformer_cpu
