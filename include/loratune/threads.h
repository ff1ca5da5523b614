// CPU threads for compute that follow the machine's load. On a busy PC, OpenMP's intra-op threads wait for each
// other at every parallel region, and one thread the OS has descheduled stalls them all: all cores can be 10-50x
// slower than one. `auto` watches how much CPU the rest of the machine uses (/proc/stat less this process) and tries
// one thread fewer when others are busy, one more when cores are idle, keeping a change only when the measured
// time per item confirms it. On a quiet machine it stays at one thread per core and never probes.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace loratune {

inline constexpr int kAutoThreads = -1;

// "auto" -> kAutoThreads; a count >= 0 (0: one per core) pins it; InputError otherwise.
int parse_threads(const std::string& text);
// One per core this process may run on.
int available_cores();
// Sets the intra-op threads of the calling thread: a count (0: one per core), or for kAutoThreads the cores the
// other processes leave (read over 0.1 s; at least 1). Returns the count set.
int set_compute_threads(int threads);

// set_compute_threads for as long as the object lives; the calling thread's count before comes back at the end, so
// that a library call leaves the caller's setting as it found it.
class ComputeThreadsScope {
 public:
  explicit ComputeThreadsScope(int threads);
  ~ComputeThreadsScope();
  ComputeThreadsScope(const ComputeThreadsScope&) = delete;
  ComputeThreadsScope& operator=(const ComputeThreadsScope&) = delete;

 private:
  int previous_;
};

// CPU use of the whole machine and of this process between two readings.
class CpuLoad {
 public:
  CpuLoad();
  // Cores' worth of CPU the other processes used since the last reading, this process's own, and the cores nobody
  // used; false when the machine does not say (no /proc/stat) or less than `min_seconds` passed.
  bool sample(double min_seconds, double& others, double& own, double& idle);

 private:
  bool read(double& machine_busy, double& own) const;
  double machine_busy_ = 0, own_ = 0;
  std::chrono::steady_clock::time_point when_;
  bool valid_ = false;
  int machine_cores_ = 1;
};

// Sets and adjusts the intra-op thread count of the calling thread's compute. Pinned (a count) it only sets it.
class ThreadTuner {
 public:
  struct Options {
    int probe_samples = 3;        // units of work measured at a candidate count (the median decides)
    double better = 0.92;         // a candidate is kept when its time per item is below this x the current one
    double abort = 1.5;           // a candidate's first unit this much slower than the current ends the probe
    int retry_after = 16;         // units before a direction that failed is tried again (doubles up to 512)
    double min_sample_seconds = 0.2;  // CPU load is read over at least this long
    int start = 0;                    // auto: the first count; 0: the cores other processes leave
    // Where CPU load readings come from (others, own, idle cores; false: none yet); empty: CpuLoad on /proc/stat.
    std::function<bool(double& others, double& own, double& idle)> load;
  };
  explicit ThreadTuner(int threads);
  ThreadTuner(int threads, Options options);

  // After each unit of work (a training step, an evaluation batch): its seconds and the items (images) it did.
  void record(double seconds, int64_t items);

  int threads() const { return current_; }
  bool adaptive() const { return adaptive_; }
  // Thread counts chosen so far, in order, for reports ("2 -> 1 -> 2").
  const std::vector<int>& history() const { return history_; }

 private:
  void apply(int threads);
  void finish_probe(bool keep);

  Options options_;
  bool adaptive_ = false;
  int max_threads_ = 1, current_ = 1;
  CpuLoad load_;
  std::vector<double> recent_;   // seconds per item at the current count, newest last
  int candidate_ = 0;            // 0: not probing
  std::vector<double> probe_;
  int64_t units_ = 0;
  int64_t blocked_until_[2] = {0, 0};  // per direction (fewer, more): no probe before this unit
  int backoff_[2] = {0, 0};
  std::vector<int> history_;
};

}  // namespace loratune
