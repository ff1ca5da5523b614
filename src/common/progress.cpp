#include "common/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "common/strings.h"

namespace loratune {

using Clock = std::chrono::steady_clock;

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(std::max<int64_t>(total, 0)),
      tty_(::isatty(STDERR_FILENO) == 1), start_(Clock::now()), rate_base_time_(start_),
      last_draw_(start_ - std::chrono::hours(1)) {}  // time_point::min() would overflow in `now - last_draw_`

ProgressBar::~ProgressBar() {
  if (!finished_ && tty_ && done_ > 0) std::fputc('\n', stderr);
}

double ProgressBar::elapsed_seconds() const {
  return std::chrono::duration<double>(Clock::now() - start_).count();
}

double ProgressBar::rate() const {
  const double dt = std::chrono::duration<double>(Clock::now() - rate_base_time_).count();
  return dt > 0 ? static_cast<double>(done_ - rate_base_done_) / dt : 0.0;
}

void ProgressBar::restart_rate(int64_t done_so_far) {
  rate_base_done_ = done_so_far;
  rate_base_time_ = Clock::now();
}

void ProgressBar::update(int64_t done, const std::string& status) {
  done_ = std::min(done, total_ > 0 ? total_ : done);
  status_ = status;
  const auto now = Clock::now();
  const auto interval = tty_ ? std::chrono::milliseconds(100) : std::chrono::milliseconds(10000);
  if (now - last_draw_ >= interval) draw(false), last_draw_ = now;
}

void ProgressBar::finish(const std::string& status) {
  if (finished_) return;
  if (!status.empty()) status_ = status;
  draw(true);
  finished_ = true;
}

void ProgressBar::draw(bool final_line) {
  const double r = rate();
  const double remaining = r > 0 && total_ > 0 ? static_cast<double>(total_ - done_) / r : -1;
  const double fraction = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 0.0;
  std::string bar;
  if (total_ > 0) {
    const int width = 24, filled = static_cast<int>(fraction * width);
    bar = "[" + std::string(filled, '#') + std::string(width - filled, '.') + "] ";
  }
  char counts[160];
  std::snprintf(counts, sizeof counts, "%lld/%lld %3.0f%% %s<%s %.1f %s/s", static_cast<long long>(done_),
                static_cast<long long>(total_), 100.0 * fraction, human_duration(elapsed_seconds()).c_str(),
                final_line ? "0s" : human_duration(remaining).c_str(), r, unit_.c_str());
  const std::string line = label_ + " " + bar + counts + (status_.empty() ? "" : "  " + status_);
  if (tty_) std::fprintf(stderr, "\r\033[2K%s%s", line.c_str(), final_line ? "\n" : "");
  else std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

}  // namespace loratune
