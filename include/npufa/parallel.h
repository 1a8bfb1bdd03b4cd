// The one threading seam of npufa: a persistent pool with a settable size.
#pragma once
#include <cstdint>
#include <functional>

namespace npufa {

// Number of threads kernels use (default: hardware concurrency). n <= 0 resets to the default.
void set_num_threads(int n);
int get_num_threads();

// Runs fn(i) for i in [0, n), spread over the pool with dynamic scheduling; fn(i, thread_index)
// receives a thread index in [0, get_num_threads()) for per-thread scratch. Calls made from inside
// a worker run serially on that worker.
void parallel_for(int64_t n, const std::function<void(int64_t item, int thread)>& fn);
// Same with an explicit thread count: thread indices stay below `threads` even if
// set_num_threads() is called concurrently (kernels size per-thread scratch with it).
void parallel_for(int64_t n, int threads, const std::function<void(int64_t item, int thread)>& fn);
// Same, but each thread claims its next item before running the current one and fn also receives
// that item (-1: none), so a kernel can prefetch the next item's first data during the current
// item's last work. Scheduling is otherwise the same (at most one claimed item waits per thread).
void parallel_for_ahead(int64_t n, int threads,
                        const std::function<void(int64_t item, int64_t next, int thread)>& fn);

}  // namespace npufa
