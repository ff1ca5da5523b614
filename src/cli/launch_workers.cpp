// `loratune train --nproc N`: N local workers with torchrun's variables, for people without Python. They meet in a
// store file in a private folder instead of at a port.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "common/files.h"
#include "loratune/errors.h"

namespace loratune {
namespace {

volatile sig_atomic_t g_interrupts = 0;
void count_interrupt(int) { g_interrupts = g_interrupts + 1; }

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return exit_code::kRuntime;
}

// Worker `rank` of `workers`: this binary again with `argv` and torchrun's variables, in its own process group.
pid_t start_worker(int rank, int workers, pid_t launcher, const std::string& store_file, std::vector<char*>& argv) {
  const pid_t pid = ::fork();
  if (pid < 0) throw RuntimeFailure("cannot start worker " + std::to_string(rank));
  if (pid > 0) return pid;
  // When the launcher dies (even by SIGKILL), its workers are asked to stop as Ctrl-C would: they checkpoint and
  // exit instead of training on unsupervised.
  ::prctl(PR_SET_PDEATHSIG, SIGINT);
  if (::getppid() != launcher) ::_exit(exit_code::kInterrupted);  // it died before prctl
  ::setpgid(0, 0);
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGTERM, SIG_DFL);
  ::setenv("RANK", std::to_string(rank).c_str(), 1);
  ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
  ::setenv("WORLD_SIZE", std::to_string(workers).c_str(), 1);
  ::setenv("LOCAL_WORLD_SIZE", std::to_string(workers).c_str(), 1);
  ::setenv("LORATUNE_STORE_FILE", store_file.c_str(), 1);
  ::setenv("LORATUNE_NPROC", std::to_string(workers).c_str(), 1);  // for the resume hint
  ::execv("/proc/self/exe", argv.data());
  std::fprintf(stderr, "error: cannot start worker %d\n", rank);
  ::_exit(exit_code::kRuntime);
}

// Waits for the workers and passes interrupts on; when one fails, the others get a grace period to notice, then
// are stopped. The first failure's exit code, or 0.
int supervise(const std::vector<pid_t>& pids) {
  int result = exit_code::kOk, forwarded = 0;
  size_t running = pids.size();
  std::vector<bool> done(pids.size(), false);
  std::chrono::steady_clock::time_point failed_at{};
  bool failed = false, terminated = false;
  auto signal_running = [&](int signal) {
    for (size_t i = 0; i < pids.size(); ++i)
      if (!done[i]) ::kill(pids[i], signal);
  };
  while (running > 0) {
    if (g_interrupts > forwarded) {
      forwarded = g_interrupts;
      signal_running(SIGINT);
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (size_t i = 0; i < pids.size(); ++i)
        if (pids[i] == pid && !done[i]) {
          done[i] = true;
          --running;
          const int code = exit_code_of(status);
          if (code != 0 && !failed) {
            failed = true;
            failed_at = std::chrono::steady_clock::now();
            result = code;
            if (code != exit_code::kInterrupted)
              std::fprintf(stderr, "worker %zu (of %zu) exited with code %d; stopping the others\n", i, pids.size(), code);
          }
        }
      continue;
    }
    if (failed && !terminated && std::chrono::steady_clock::now() - failed_at > std::chrono::seconds(15)) {
      terminated = true;
      signal_running(SIGKILL);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return result;
}

}  // namespace

int launch_local_workers(int workers, const std::vector<std::string>& args) {
  return guarded([&] {
    if (workers < 1 || workers > 1024) throw InputError("--nproc must be from 1 to 1024");
    if (std::getenv("WORLD_SIZE")) throw InputError("--nproc starts workers itself: do not combine it with torchrun");
    const PrivateFolder store_folder("loratune-workers");  // for the workers' store file
    const std::string store_file = (store_folder.path() / "store").string();
    std::vector<char*> argv;
    std::vector<std::string> storage = args;
    storage.insert(storage.begin(), "loratune");
    for (auto& a : storage) argv.push_back(a.data());
    argv.push_back(nullptr);

    // Workers get their own process group: a Ctrl-C reaches this launcher only, which passes it on once.
    struct sigaction action {};
    action.sa_handler = count_interrupt;
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGTERM, &action, nullptr);
    std::vector<pid_t> pids;
    for (int rank = 0; rank < workers; ++rank) pids.push_back(start_worker(rank, workers, ::getpid(), store_file, argv));
    return supervise(pids);
  });
}

}  // namespace loratune
