// parallel_for on the OpenMP runtime. The extension links libgomp.so.1 by soname and torch is
// imported first, which loads its own libgomp.so.1: the loader then binds us to torch's copy,
// so our parallel regions run on torch's intra-op threads instead of competing with them
// (torch's threads spin after each op; a second pool of ours would lose its core to them).
#pragma once
#include <functional>

namespace tensorpress {

// Runs fn(task, worker) for task in [0, n_tasks) on up to `n_threads` threads (worker in
// [0, n_threads)). Blocks until all tasks are done; the first exception is re-thrown here.
// In a forked child (e.g. a DataLoader worker) it runs serially: OpenMP does not survive fork.
void parallel_for(int n_tasks, int n_threads, const std::function<void(int task, int worker)>& fn);

}  // namespace tensorpress
