// The parallel_for seam: coverage, thread indices, nesting, exceptions.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "npufa/parallel.h"

namespace npufa {
namespace {

struct ThreadCount {
  int saved = get_num_threads();
  explicit ThreadCount(int n) { set_num_threads(n); }
  ~ThreadCount() { set_num_threads(saved); }
};

TEST(Parallel, SetAndGetThreads) {
  ThreadCount tc(3);
  EXPECT_EQ(get_num_threads(), 3);
  set_num_threads(1);
  EXPECT_EQ(get_num_threads(), 1);
  set_num_threads(0);  // reset to the default
  EXPECT_GE(get_num_threads(), 1);
  set_num_threads(-5);
  EXPECT_GE(get_num_threads(), 1);
}

TEST(Parallel, EveryIndexExactlyOnce) {
  for (int threads : {1, 2, 4}) {
    ThreadCount tc(threads);
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{3}, int64_t{17}, int64_t{1000}, int64_t{100003}}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      for (auto& h : hits) h = 0;
      parallel_for(n, [&](int64_t i, int) { hits[static_cast<size_t>(i)].fetch_add(1); });
      int64_t bad = 0;
      for (auto& h : hits) bad += h.load() != 1;
      EXPECT_EQ(bad, 0) << "threads " << threads << " n " << n;
    }
  }
}

// parallel_for_ahead: every index once, and each call's `next` is the item its thread runs next
// (-1 after its last), so a kernel may prefetch for it; exceptions still reach the caller.
TEST(Parallel, AheadGivesEachThreadItsNextItem) {
  for (int threads : {1, 2, 4}) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{7}, int64_t{1000}}) {
      std::mutex mu;
      std::vector<std::vector<std::pair<int64_t, int64_t>>> seq(static_cast<size_t>(threads));  // (item, next)
      parallel_for_ahead(n, threads, [&](int64_t i, int64_t next, int tid) {
        std::lock_guard<std::mutex> lk(mu);
        seq[static_cast<size_t>(tid)].push_back({i, next});
      });
      std::vector<int> hits(static_cast<size_t>(n));
      int64_t wrong_next = 0;
      for (const auto& s : seq)
        for (size_t k = 0; k < s.size(); ++k) {
          ++hits[static_cast<size_t>(s[k].first)];
          wrong_next += s[k].second != (k + 1 < s.size() ? s[k + 1].first : -1);
        }
      int64_t bad = 0;
      for (int h : hits) bad += h != 1;
      EXPECT_EQ(bad, 0) << "threads " << threads << " n " << n;
      EXPECT_EQ(wrong_next, 0) << "threads " << threads << " n " << n;
    }
    EXPECT_THROW(parallel_for_ahead(100, threads,
                                    [](int64_t i, int64_t, int) {
                                      if (i == 42) throw std::runtime_error("boom");
                                    }),
                 std::runtime_error);
  }
}

// Workers spin briefly after a region and then sleep: regions back to back (caught while spinning)
// and regions after a pause longer than the spin (woken from sleep) both cover every index once.
TEST(Parallel, BackToBackAndSpacedRegions) {
  ThreadCount tc(3);
  std::vector<std::atomic<int>> hits(64);
  for (int round = 0; round < 200; ++round) {
    if (round % 20 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    for (auto& h : hits) h = 0;
    parallel_for(64, [&](int64_t i, int) { hits[static_cast<size_t>(i)].fetch_add(1); });
    int64_t bad = 0;
    for (auto& h : hits) bad += h.load() != 1;
    ASSERT_EQ(bad, 0) << "round " << round;
  }
}

TEST(Parallel, ThreadIndicesBelowThreadCount) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadCount tc(threads);
    std::mutex mu;
    std::set<int> seen;
    std::set<std::thread::id> ids;
    parallel_for(2000, [&](int64_t, int t) {
      std::lock_guard<std::mutex> lk(mu);
      seen.insert(t);
      ids.insert(std::this_thread::get_id());
      EXPECT_GE(t, 0);
      EXPECT_LT(t, get_num_threads());
    });
    EXPECT_LE(static_cast<int>(seen.size()), threads);
    EXPECT_LE(static_cast<int>(ids.size()), threads);
    EXPECT_GE(*seen.begin(), 0);
    EXPECT_LT(*seen.rbegin(), threads);
  }
}

// The same thread index is never used by two threads at once (per-thread scratch is safe).
TEST(Parallel, ThreadIndexIsExclusive) {
  ThreadCount tc(4);
  std::vector<std::atomic<int>> busy(4);
  for (auto& b : busy) b = 0;
  std::atomic<int> clashes{0};
  parallel_for(400, [&](int64_t, int t) {
    if (busy[static_cast<size_t>(t)].fetch_add(1) != 0) clashes++;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    busy[static_cast<size_t>(t)].fetch_sub(1);
  });
  EXPECT_EQ(clashes.load(), 0);
}

TEST(Parallel, NestedCallsRunSeriallyWithoutDeadlock) {
  ThreadCount tc(2);
  auto run = [] {
    std::atomic<int64_t> total{0};
    std::atomic<int> bad_tid{0};
    parallel_for(8, [&](int64_t i, int outer_tid) {
      const auto me = std::this_thread::get_id();
      parallel_for(50, [&](int64_t j, int t) {
        // Inner items run on the calling worker.
        if (std::this_thread::get_id() != me || t != 0) bad_tid++;
        total += i * 50 + j;
      });
      (void)outer_tid;
    });
    EXPECT_EQ(bad_tid.load(), 0);
    return total.load();
  };
  std::promise<int64_t> result;
  auto fut = result.get_future();
  std::thread t([&] { result.set_value(run()); });
  if (fut.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
    std::fprintf(stderr, "FAILED: nested parallel_for deadlocked\n");
    std::fflush(nullptr);
    std::_Exit(1);  // the deadlocked threads cannot be joined
  }
  t.join();
  const int64_t n = 8 * 50;
  EXPECT_EQ(fut.get(), n * (n - 1) / 2);
}

TEST(Parallel, ExceptionsPropagateAndPoolStaysUsable) {
  for (int threads : {1, 2, 4}) {
    ThreadCount tc(threads);
    for (int64_t bad : {int64_t{0}, int64_t{57}, int64_t{999}}) {
      EXPECT_THROW(parallel_for(1000,
                                [&](int64_t i, int) {
                                  if (i == bad) throw std::runtime_error("boom");
                                }),
                   std::runtime_error)
          << "threads " << threads << " item " << bad;
    }
    // A nested exception reaches the outer caller too.
    EXPECT_THROW(parallel_for(10,
                              [](int64_t i, int) {
                                parallel_for(10, [&](int64_t j, int) {
                                  if (i == 3 && j == 4) throw std::out_of_range("inner");
                                });
                              }),
                 std::out_of_range);
    std::atomic<int64_t> sum{0};
    parallel_for(1000, [&](int64_t i, int) { sum += i; });
    EXPECT_EQ(sum.load(), 999 * 1000 / 2) << "pool unusable after an exception, threads " << threads;
  }
}

// Two application threads calling parallel_for at once both finish correctly.
TEST(Parallel, ConcurrentCallersFromTwoThreads) {
  ThreadCount tc(2);
  auto job = [] {
    int64_t ok = 0;
    for (int rep = 0; rep < 50; ++rep) {
      std::atomic<int64_t> s{0};
      parallel_for(300, [&](int64_t i, int) { s += i; });
      ok += s.load() == 299 * 300 / 2;
    }
    return ok;
  };
  auto a = std::async(std::launch::async, job), b = std::async(std::launch::async, job);
  ASSERT_EQ(a.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  ASSERT_EQ(b.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  EXPECT_EQ(a.get(), 50);
  EXPECT_EQ(b.get(), 50);
}

}  // namespace
}  // namespace npufa
