#include "loratune/process_group.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>

#include "loratune/errors.h"

#ifdef LORATUNE_WITH_C10D_GLOO
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "distributed/rendezvous_store.h"
#endif

namespace loratune {
namespace {

int env_int(const char* name, int fallback, int min, int max) {
  const char* text = std::getenv(name);
  if (!text || !*text) return fallback;
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (*end != '\0' || v < min || v > max)
    throw InputError(std::string("environment variable ") + name + "=" + text + ": expected an integer from " +
                     std::to_string(min) + " to " + std::to_string(max));
  return static_cast<int>(v);
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

WorkerEnvironment worker_environment() {
  WorkerEnvironment e;
  e.world_size = env_int("WORLD_SIZE", 1, 1, 65536);
  e.rank = env_int("RANK", 0, 0, 65535);
  e.local_rank = env_int("LOCAL_RANK", e.rank, 0, 65535);
  e.master_port = env_int("MASTER_PORT", 29500, 1, 65535);
  if (const char* addr = std::getenv("MASTER_ADDR"); addr && *addr) e.master_addr = addr;
  if (const char* file = std::getenv("LORATUNE_STORE_FILE"); file && *file) e.store_file = file;
  if (e.rank >= e.world_size)
    throw InputError("RANK " + std::to_string(e.rank) + " is not below WORLD_SIZE " + std::to_string(e.world_size) +
                     ": start the workers with ranks 0 to WORLD_SIZE-1 (torchrun does)");
  return e;
}

std::string WorkerEnvironment::rendezvous() const {
  return store_file.empty() ? master_addr + ":" + std::to_string(master_port) : "local";
}

std::chrono::seconds distributed_timeout() {
  return std::chrono::seconds(env_int("LORATUNE_DIST_TIMEOUT", 300, 1, 86400));
}

#ifdef LORATUNE_WITH_C10D_GLOO

bool distributed_available() { return true; }

struct ProcessGroup::Impl {
  std::unique_ptr<RendezvousServer> server;  // rank 0, unless torchrun or a store file serves the rendezvous
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
  std::chrono::milliseconds timeout;
  std::string store_folder;  // --nproc's private folder
};

ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl, int rank, int size)
    : impl_(std::move(impl)), rank_(rank), size_(size) {}

ProcessGroup::~ProcessGroup() {
  // The last worker's store removes its file; its folder then goes too (also when the launcher was killed).
  impl_->group.reset();
  if (!impl_->store_folder.empty()) ::rmdir(impl_->store_folder.c_str());
}

namespace {

// The rendezvous store: the launcher's store file for local workers; torchrun's own store when its agent hosts one;
// else ours, served by rank 0 at MASTER_ADDR:MASTER_PORT (`server`).
c10::intrusive_ptr<c10d::Store> open_store(const WorkerEnvironment& env, std::chrono::seconds timeout,
                                           std::unique_ptr<RendezvousServer>& server) {
  if (!env.store_file.empty()) {
    try {
      auto store = c10::make_intrusive<c10d::FileStore>(env.store_file, env.world_size);
      store->setTimeout(timeout);
      return store;
    } catch (const std::exception& e) {
      throw RuntimeFailure("rank " + std::to_string(env.rank) + ": cannot open the store file " + env.store_file +
                           ": " + first_line(e.what()));
    }
  }
  try {
    if (const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE"); agent && std::string(agent) == "True") {
      c10d::TCPStoreOptions options;
      options.port = static_cast<std::uint16_t>(env.master_port);
      options.isServer = false;
      options.timeout = timeout;
      return c10::make_intrusive<c10d::TCPStore>(env.master_addr, options);
    }
    if (env.rank == 0) server = std::make_unique<RendezvousServer>(env.master_addr, env.master_port);
    return c10::make_intrusive<RendezvousClient>(env.master_addr, env.master_port, timeout);
  } catch (const InputError&) {
    throw;
  } catch (const std::exception& e) {
    throw RuntimeFailure("rank " + std::to_string(env.rank) + ": the " + std::to_string(env.world_size) +
                         " workers at " + env.rendezvous() + " did not join within " + std::to_string(timeout.count()) +
                         " s (a worker did not start, or WORLD_SIZE differs between them): " + first_line(e.what()));
  }
}

}  // namespace

std::unique_ptr<ProcessGroup> ProcessGroup::join(const WorkerEnvironment& env, std::chrono::seconds timeout) {
  const std::string where = env.rendezvous();
  std::unique_ptr<RendezvousServer> server;
  c10::intrusive_ptr<c10d::Store> store = open_store(env, timeout, server);
  // Every worker says how many it expects; a disagreement is a launch error, not a hang.
  try {
    const std::string mine = std::to_string(env.world_size);
    store->set("loratune/world_size/" + std::to_string(env.rank), std::vector<uint8_t>(mine.begin(), mine.end()));
    for (int r = 0; r < env.world_size; ++r) {
      const auto theirs = store->get("loratune/world_size/" + std::to_string(r));
      if (std::string(theirs.begin(), theirs.end()) != mine)
        throw InputError("worker " + std::to_string(r) + " was started with WORLD_SIZE " +
                         std::string(theirs.begin(), theirs.end()) + ", this one with " + mine + ": start all with the same");
    }
  } catch (const InputError&) {
    // The others learn of the disagreement from the store: it stays up until they have read it and left.
    if (server) server->wait_for_clients_to_leave(1, std::chrono::seconds(5));
    throw;
  } catch (const std::exception& e) {
    throw RuntimeFailure("rank " + std::to_string(env.rank) + ": the " + std::to_string(env.world_size) +
                         " workers at " + where + " did not join within " + std::to_string(timeout.count()) +
                         " s (a worker did not start, or WORLD_SIZE differs between them): " + first_line(e.what()));
  }
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  const bool loopback =
      !env.store_file.empty() || env.master_addr == "localhost" || env.master_addr.rfind("127.", 0) == 0;
  if (const char* iface = std::getenv("GLOO_SOCKET_IFNAME"); iface && *iface)
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
  else
    options->devices.push_back(loopback ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                        : c10d::ProcessGroupGloo::createDefaultDevice());
  auto impl = std::make_unique<Impl>();
  impl->timeout = timeout;
  impl->server = std::move(server);
  if (!env.store_file.empty()) impl->store_folder = std::filesystem::path(env.store_file).parent_path().string();
  // A peer that died closes its sockets: writing to them must be an error this worker reports ("lost the other
  // workers"), not a SIGPIPE that ends it silently with code 141.
  std::signal(SIGPIPE, SIG_IGN);
  try {
    impl->group = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("loratune", store), env.rank, env.world_size, options);
  } catch (const std::exception& e) {
    throw RuntimeFailure("rank " + std::to_string(env.rank) + ": connecting the workers failed: " + first_line(e.what()));
  }
  return std::unique_ptr<ProcessGroup>(new ProcessGroup(std::move(impl), env.rank, env.world_size));
}

void ProcessGroup::all_reduce(at::Tensor& buffer) {
  std::vector<at::Tensor> buffers{buffer};
  try {
    impl_->group->allreduce(buffers)->wait(impl_->timeout);
  } catch (const std::exception& e) {
    throw RuntimeFailure("rank " + std::to_string(rank_) + ": lost the other workers (one stopped, crashed or hangs; "
                         "waited at most " + std::to_string(impl_->timeout.count() / 1000) + " s): " +
                         first_line(e.what()));
  }
}

void ProcessGroup::sum(const std::vector<at::Tensor>& tensors) {
  if (tensors.empty()) return;
  std::vector<at::Tensor> flat_parts;
  for (const auto& t : tensors) flat_parts.push_back(t.detach().reshape({-1}).to(at::kCPU, at::kFloat));
  at::Tensor buffer = at::cat(flat_parts);
  all_reduce(buffer);
  at::NoGradGuard no_grad;
  int64_t offset = 0;
  for (const auto& t : tensors) {
    const int64_t n = t.numel();
    t.copy_(buffer.narrow(0, offset, n).view(t.sizes()));
    offset += n;
  }
}

std::vector<double> ProcessGroup::sum(const std::vector<double>& values) {
  at::Tensor buffer = at::tensor(values, at::kDouble);
  all_reduce(buffer);
  return std::vector<double>(buffer.data_ptr<double>(), buffer.data_ptr<double>() + buffer.numel());
}

void ProcessGroup::barrier() { sum(std::vector<double>{0.0}); }

std::pair<at::Tensor, int64_t> ProcessGroup::gather_rows(const at::Tensor& rows) {
  // Each rank's row count and width in its own places; then the rows, each rank's in its place of a zero buffer.
  std::vector<double> shape(2 * static_cast<size_t>(size_), 0.0);
  shape[2 * static_cast<size_t>(rank_)] = static_cast<double>(rows.size(0));
  shape[2 * static_cast<size_t>(rank_) + 1] = rows.size(0) > 0 ? static_cast<double>(rows.size(1)) : 0.0;
  shape = sum(shape);
  int64_t total = 0, offset = 0, width = 0;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) offset = total;
    total += static_cast<int64_t>(shape[2 * static_cast<size_t>(r)]);
    width = std::max(width, static_cast<int64_t>(shape[2 * static_cast<size_t>(r) + 1]));
  }
  at::Tensor buffer = at::zeros({total, width}, rows.options().device(at::kCPU));
  if (rows.size(0) > 0) buffer.narrow(0, offset, rows.size(0)).copy_(rows);
  at::Tensor flat = buffer.view({-1});
  all_reduce(flat);
  return {buffer, offset};
}

#else

bool distributed_available() { return false; }

struct ProcessGroup::Impl {};
ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl, int rank, int size)
    : impl_(std::move(impl)), rank_(rank), size_(size) {}
ProcessGroup::~ProcessGroup() = default;

std::unique_ptr<ProcessGroup> ProcessGroup::join(const WorkerEnvironment&, std::chrono::seconds) {
  throw InputError("this build of loratune has no data-parallel training: its LibTorch lacks c10d Gloo (or gloo's "
                   "headers were missing when it was built; on Debian install libgloo-dev and rebuild)");
}
void ProcessGroup::all_reduce(at::Tensor&) {}
void ProcessGroup::sum(const std::vector<at::Tensor>&) {}
std::vector<double> ProcessGroup::sum(const std::vector<double>& values) { return values; }
void ProcessGroup::barrier() {}
std::pair<at::Tensor, int64_t> ProcessGroup::gather_rows(const at::Tensor& rows) { return {rows, 0}; }

#endif

}  // namespace loratune
