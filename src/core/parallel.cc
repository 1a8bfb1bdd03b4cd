// A small persistent thread pool. One pool for the whole process: kernels never start threads.
#include "npufa/parallel.h"

#include <algorithm>
#include <exception>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace npufa {
namespace {

int default_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

thread_local bool t_in_region = false;  // workers, and a caller inside run()

// Workers and the caller spin for a short while before sleeping: back-to-back regions (a decode step
// runs two) would otherwise pay a futex wake-up each, tens of microseconds on a VM. The spin is
// bounded (kSpin), as OpenMP runtimes bound theirs.
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until ready() or kSpin has passed; false if it gave up.
template <class F>
bool spin_until(F ready) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() - t0 > kSpin) return ready();
  }
}

class Pool {
 public:
  ~Pool() { resize(0); }

  // fn(item, next, thread); ahead: next is the item the thread claimed to run after this one.
  void run(int nthreads, int64_t n, bool ahead, const std::function<void(int64_t, int64_t, int)>& fn) {
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel region at a time
    if (static_cast<int>(workers_.size()) != nthreads - 1) resize(nthreads - 1);
    next_.store(0);
    fn_ = &fn;
    n_ = n;
    ahead_ = ahead;
    active_.store(static_cast<int>(workers_.size()));
    {
      std::lock_guard<std::mutex> lk(mu_);
      generation_.fetch_add(1, std::memory_order_release);  // publishes fn_, n_ to the workers
    }
    cv_.notify_all();
    t_in_region = true;
    drain(0);
    t_in_region = false;
    if (!spin_until([&] { return active_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return active_.load(std::memory_order_acquire) == 0; });
    }
    fn_ = nullptr;
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

 private:
  // Kernels do not throw after validation, but an allocation can: keep the first error and stop.
  void drain(int tid) {
    for (int64_t i = next_.fetch_add(1); i < n_;) {
      const int64_t j = ahead_ ? next_.fetch_add(1) : -1;
      try {
        (*fn_)(i, j < n_ ? j : -1, tid);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);
        break;
      }
      i = ahead_ ? j : next_.fetch_add(1);
    }
  }

  void worker(int tid) {
    t_in_region = true;
    uint64_t seen = 0;
    for (;;) {
      const auto news = [&] { return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(news)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, news);
      }
      if (stop_.load(std::memory_order_acquire)) return;
      seen = generation_.load(std::memory_order_acquire);
      drain(tid);
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);  // the caller may be about to sleep: wake it under the lock
        done_cv_.notify_one();
      }
    }
  }

  void resize(int nworkers) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_.store(false);
    generation_.store(0);
    for (int i = 0; i < nworkers; ++i) workers_.emplace_back([this, i] { worker(i + 1); });
  }

  std::mutex call_mu_, mu_, err_mu_;
  std::exception_ptr error_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t, int)>* fn_ = nullptr;
  int64_t n_ = 0;
  bool ahead_ = false;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

Pool& pool() {
  static Pool p;
  return p;
}
std::atomic<int> g_threads{0};

}  // namespace

void set_num_threads(int n) { g_threads.store(n > 0 ? n : 0); }
int get_num_threads() {
  int n = g_threads.load();
  return n > 0 ? n : default_threads();
}

void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn) { parallel_for(n, get_num_threads(), fn); }

namespace {
void region(int64_t n, int threads, bool ahead, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  threads = std::max(threads, 1);
  if (threads == 1 || n == 1 || t_in_region) {
    for (int64_t i = 0; i < n; ++i) fn(i, ahead && i + 1 < n ? i + 1 : -1, 0);
    return;
  }
  // The pool keeps threads - 1 workers: thread indices stay below `threads`.
  pool().run(threads, n, ahead, fn);
}
}  // namespace

void parallel_for(int64_t n, int threads, const std::function<void(int64_t, int)>& fn) {
  region(n, threads, false, [&](int64_t i, int64_t, int tid) { fn(i, tid); });
}

void parallel_for_ahead(int64_t n, int threads, const std::function<void(int64_t, int64_t, int)>& fn) {
  region(n, threads, true, fn);
}

}  // namespace npufa
