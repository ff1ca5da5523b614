#include "loratune/threads.h"

#include <ATen/Parallel.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "loratune/errors.h"

namespace loratune {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double own_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

constexpr size_t kRecent = 5;       // units kept at the current count
constexpr int64_t kWarmupUnits = 2;  // the first units of a run (TorchScript profiles its graphs) are not measured

}  // namespace

int parse_threads(const std::string& text) {
  if (text == "auto") return kAutoThreads;
  char* end = nullptr;
  const long n = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || n < 0 || n > 4096)
    throw InputError("threads must be auto or a count from 0 (one per core) to 4096, not \"" + text + "\"");
  return static_cast<int>(n);
}

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

int set_compute_threads(int threads) {
  const int cores = available_cores();
  int n = threads > 0 ? std::min(threads, cores * 4) : cores;
  if (threads == kAutoThreads) {
    // The cores the other processes leave, read over a tenth of a second (the load average lags by a minute).
    CpuLoad load;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    double others = 0, own = 0, idle = 0;
    if (load.sample(0.05, others, own, idle)) n = std::clamp(static_cast<int>(std::lround(cores - others)), 1, cores);
  }
  at::set_num_threads(n);
  return n;
}

ComputeThreadsScope::ComputeThreadsScope(int threads) : previous_(at::get_num_threads()) {
  set_compute_threads(threads);
}

ComputeThreadsScope::~ComputeThreadsScope() { at::set_num_threads(previous_); }

CpuLoad::CpuLoad() {
  std::ifstream stat("/proc/stat");
  machine_cores_ = 0;
  for (std::string line; std::getline(stat, line);)
    if (line.compare(0, 3, "cpu") == 0 && line.size() > 3 && std::isdigit(static_cast<unsigned char>(line[3])))
      ++machine_cores_;
  valid_ = machine_cores_ > 0 && read(machine_busy_, own_);
  when_ = std::chrono::steady_clock::now();
}

bool CpuLoad::read(double& machine_busy, double& own) const {
  std::ifstream stat("/proc/stat");
  std::string label;
  double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  if (!(stat >> label >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal) || label != "cpu")
    return false;
  machine_busy = (user + nice + system + irq + softirq + steal) / static_cast<double>(sysconf(_SC_CLK_TCK));
  own = own_cpu_seconds();
  return true;
}

bool CpuLoad::sample(double min_seconds, double& others, double& own, double& idle) {
  if (!valid_) return false;
  const auto now = std::chrono::steady_clock::now();
  const double dt = std::chrono::duration<double>(now - when_).count();
  if (dt < min_seconds) return false;
  double busy = 0, mine = 0;
  if (!read(busy, mine)) return false;
  own = std::max(0.0, (mine - own_) / dt);
  others = std::max(0.0, (busy - machine_busy_) / dt - own);
  idle = std::max(0.0, machine_cores_ - others - own);
  machine_busy_ = busy, own_ = mine, when_ = now;
  return true;
}

ThreadTuner::ThreadTuner(int threads) : ThreadTuner(threads, Options{}) {}

ThreadTuner::ThreadTuner(int threads, Options options)
    : options_(options), adaptive_(threads == kAutoThreads), max_threads_(available_cores()) {
  current_ = set_compute_threads(adaptive_ && options_.start > 0 ? std::min(options_.start, max_threads_) : threads);
  history_.push_back(current_);
}

void ThreadTuner::apply(int threads) {
  if (at::get_num_threads() != threads) at::set_num_threads(threads);
}

void ThreadTuner::record(double seconds, int64_t items) {
  ++units_;
  if (!adaptive_ || units_ <= kWarmupUnits) return;
  const double per_item = seconds / static_cast<double>(std::max<int64_t>(1, items));
  if (candidate_ != 0) {  // probing
    probe_.push_back(per_item);
    const double now = median(recent_);
    if (probe_.size() == 1 && per_item > options_.abort * now) return finish_probe(false);
    if (static_cast<int>(probe_.size()) >= options_.probe_samples) finish_probe(median(probe_) < options_.better * now);
    return;
  }
  recent_.push_back(per_item);
  if (recent_.size() > kRecent) recent_.erase(recent_.begin());
  double others = 0, own = 0, idle = 0;
  if (!(options_.load ? options_.load(others, own, idle) : load_.sample(options_.min_sample_seconds, others, own, idle)))
    return;
  // Others busy: the cores they leave (fewer threads stop ours from waiting for descheduled ones). Idle cores: use
  // them. A timed probe confirms either.
  if (others > 0.5 && current_ > 1 && units_ >= blocked_until_[0])
    candidate_ = std::clamp(static_cast<int>(std::lround(max_threads_ - others)), 1, current_ - 1);
  else if (idle >= 0.75 && current_ < max_threads_ && units_ >= blocked_until_[1])
    candidate_ = std::min(max_threads_, current_ + std::max(1, static_cast<int>(idle)));
  if (candidate_ != 0) apply(candidate_);
}

void ThreadTuner::finish_probe(bool keep) {
  const int direction = candidate_ < current_ ? 0 : 1;
  if (keep) {
    current_ = candidate_;
    recent_ = probe_;
    backoff_[direction] = 0;
    blocked_until_[1 - direction] = units_ + options_.retry_after;  // do not turn straight back
    history_.push_back(current_);
  } else {
    backoff_[direction] = std::min(backoff_[direction] ? backoff_[direction] * 2 : options_.retry_after, 512);
    blocked_until_[direction] = units_ + backoff_[direction];
  }
  apply(current_);
  candidate_ = 0;
  probe_.clear();
}

}  // namespace loratune
