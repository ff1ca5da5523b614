// Progress bar with rate and ETA on stderr. On a terminal it redraws one line; otherwise (logs, CI) it prints a
// line at most every 10 seconds and at the end, so long work stays visible without flooding the log.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace loratune {

class ProgressBar {
 public:
  ProgressBar(std::string label, int64_t total, std::string unit = "it");
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // `done` items of `total` so far; `status` is shown after the bar (loss, memory, ...).
  void update(int64_t done, const std::string& status = "");
  void finish(const std::string& status = "");

  double elapsed_seconds() const;
  // Items per second since the bar was created (or since `restart_rate`).
  double rate() const;
  void restart_rate(int64_t done_so_far);

 private:
  void draw(bool final_line);

  std::string label_, unit_, status_;
  int64_t total_, done_ = 0, rate_base_done_ = 0;
  bool tty_, finished_ = false;
  std::chrono::steady_clock::time_point start_, rate_base_time_, last_draw_;
};

}  // namespace loratune
