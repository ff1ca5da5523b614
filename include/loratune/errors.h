// Error kinds, each with its own exit code on the command line.
#pragma once

#include <stdexcept>
#include <string>

namespace loratune {

// Something the user gave us is wrong: a file, a config value, a folder. The message says what to do.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The work itself failed (training diverged, a device error).
struct RuntimeFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The user asked us to stop (Ctrl-C); the state needed to resume was saved.
struct Interrupted : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace exit_code {
constexpr int kOk = 0;
constexpr int kUsage = 2;        // bad command line
constexpr int kInput = 3;        // bad input files, config or data
constexpr int kRuntime = 4;      // the work failed
constexpr int kInterrupted = 130;
}  // namespace exit_code

}  // namespace loratune
