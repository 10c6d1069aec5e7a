#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

namespace tensorpress {
namespace {

class ThreadPool {
 public:
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int n_tasks, int n_threads, const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    grow_to(n_threads - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      n_tasks_ = n_tasks;
      next_task_.store(0);
      active_helpers_ = n_threads - 1;
      pending_helpers_ = n_threads - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_helpers_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void grow_to(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id] { loop(id); });
    }
  }

  void loop(int id) {
    long seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || (generation_ != seen && id <= active_helpers_); });
        if (stopping_) return;
        seen = generation_;
      }
      work(id);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_helpers_ == 0) done_.notify_all();
    }
  }

  void work(int worker) {
    for (;;) {
      int task = next_task_.fetch_add(1);
      if (task >= n_tasks_) return;
      try {
        (*job_)(task, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
        next_task_.store(n_tasks_);  // stop handing out work
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int, int)>* job_ = nullptr;
  int n_tasks_ = 0;
  std::atomic<int> next_task_{0};
  int active_helpers_ = 0, pending_helpers_ = 0;
  long generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

ThreadPool& pool() {
  // Never destroyed (avoids exit-order hangs); rebuilt in a forked child, whose copy of the
  // pool has no threads behind it (DataLoader workers fork).
  static ThreadPool* instance = nullptr;
  static pid_t owner = 0;
  if (instance == nullptr || owner != getpid()) {
    instance = new ThreadPool();
    owner = getpid();
  }
  return *instance;
}

}  // namespace

void parallel_for(int n_tasks, int n_threads, const std::function<void(int, int)>& fn) {
  n_threads = std::max(1, std::min(n_threads, n_tasks));
  if (n_threads == 1) {
    for (int t = 0; t < n_tasks; ++t) fn(t, 0);
    return;
  }
  pool().run(n_tasks, n_threads, fn);
}

}  // namespace tensorpress
