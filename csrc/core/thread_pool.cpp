#include "core/thread_pool.h"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <mutex>

namespace tensorpress {
namespace {
const pid_t kLoadedIn = getpid();
}  // namespace

void parallel_for(int n_tasks, int n_threads, const std::function<void(int, int)>& fn) {
  n_threads = std::max(1, std::min(n_threads, n_tasks));
  if (n_threads == 1 || getpid() != kLoadedIn) {
    for (int t = 0; t < n_tasks; ++t) fn(t, 0);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
  for (int t = 0; t < n_tasks; ++t) {
    try {
      fn(t, omp_get_thread_num());
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace tensorpress
