// A small persistent thread pool: parallel_for over task indices, dynamic scheduling.
#pragma once
#include <functional>

namespace tensorpress {

// Runs fn(task, worker) for task in [0, n_tasks) on up to `n_threads` workers (the caller is
// worker 0). Blocks until all tasks are done. Exceptions from a task are re-thrown here.
void parallel_for(int n_tasks, int n_threads, const std::function<void(int task, int worker)>& fn);

}  // namespace tensorpress
