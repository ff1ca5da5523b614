// `loratune train --nproc N`: N local workers started the way torchrun starts them, for people without Python.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "loratune/errors.h"

namespace loratune {
namespace {

volatile sig_atomic_t g_interrupts = 0;
void count_interrupt(int) { g_interrupts = g_interrupts + 1; }

// A port the system reports free on the loopback interface (another program may still take it before rank 0 does:
// that ends in the "port in use" error, and a rerun picks another).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw RuntimeFailure("cannot open a socket to find a free port");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  if (!ok) throw RuntimeFailure("cannot find a free port on 127.0.0.1");
  return ntohs(addr.sin_port);
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return exit_code::kRuntime;
}

}  // namespace

int launch_local_workers(int workers, const std::vector<std::string>& args) {
  return guarded([&] {
    if (workers < 1 || workers > 1024) throw InputError("--nproc must be from 1 to 1024");
    if (std::getenv("WORLD_SIZE")) throw InputError("--nproc starts workers itself: do not combine it with torchrun");
    const char* port_env = std::getenv("MASTER_PORT");
    const std::string port = port_env && *port_env ? port_env : std::to_string(free_port());
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
    for (int rank = 0; rank < workers; ++rank) {
      const pid_t pid = ::fork();
      if (pid < 0) throw RuntimeFailure("cannot start worker " + std::to_string(rank));
      if (pid == 0) {
        ::setpgid(0, 0);
        ::signal(SIGINT, SIG_DFL);
        ::signal(SIGTERM, SIG_DFL);
        ::setenv("RANK", std::to_string(rank).c_str(), 1);
        ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
        ::setenv("WORLD_SIZE", std::to_string(workers).c_str(), 1);
        ::setenv("LOCAL_WORLD_SIZE", std::to_string(workers).c_str(), 1);
        ::setenv("MASTER_ADDR", "127.0.0.1", 1);
        ::setenv("MASTER_PORT", port.c_str(), 1);
        ::setenv("LORATUNE_NPROC", std::to_string(workers).c_str(), 1);  // for the resume hint
        ::execv("/proc/self/exe", argv.data());
        std::fprintf(stderr, "error: cannot start worker %d\n", rank);
        ::_exit(exit_code::kRuntime);
      }
      pids.push_back(pid);
    }

    // Wait; pass interrupts on; when a worker fails, the others get a grace period to notice, then are stopped.
    int result = exit_code::kOk, forwarded = 0;
    size_t running = pids.size();
    std::vector<bool> done(pids.size(), false);
    std::chrono::steady_clock::time_point failed_at{};
    bool failed = false, terminated = false;
    while (running > 0) {
      if (g_interrupts > forwarded) {
        forwarded = g_interrupts;
        for (size_t i = 0; i < pids.size(); ++i)
          if (!done[i]) ::kill(pids[i], SIGINT);
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
                std::fprintf(stderr, "worker %zu (of %d) exited with code %d; stopping the others\n", i, workers, code);
            }
          }
        continue;
      }
      if (failed && !terminated && std::chrono::steady_clock::now() - failed_at > std::chrono::seconds(15)) {
        terminated = true;
        for (size_t i = 0; i < pids.size(); ++i)
          if (!done[i]) ::kill(pids[i], SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return result;
  });
}

}  // namespace loratune
