// Data-parallel training on LibTorch's c10d: a Gloo process group joined the way torchrun starts workers, and the
// few collectives training needs. Built when the LibTorch at hand has c10d Gloo (distributed_available()).
#pragma once

#include <ATen/Tensor.h>

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace loratune {

// One worker's place, from torchrun's variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (a single
// process when WORLD_SIZE is unset). InputError for values that do not parse or do not fit together.
// Workers on one machine started by `loratune train --nproc` meet in a store file instead (LORATUNE_STORE_FILE, in
// a folder only the user can open): no port is opened for them beyond Gloo's own connections on 127.0.0.1.
struct WorkerEnvironment {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string store_file;  // local workers: the rendezvous file; empty: rank 0 hosts a TCPStore at the master
  std::string rendezvous() const;  // "127.0.0.1:29500", or "local" for a store file
};
WorkerEnvironment worker_environment();

bool distributed_available();

// How long a worker waits for the others to join, and for any collective: LORATUNE_DIST_TIMEOUT (seconds), else
// 300 s. A worker that died is noticed at once (its connections close); one that hangs, after this.
std::chrono::seconds distributed_timeout();

class ProcessGroup {
 public:
  // Joins the group: rank 0 hosts the rendezvous store at master_addr:master_port. RuntimeFailure with one line when
  // a worker does not join within `timeout`, InputError when the port is in use or the world sizes disagree.
  static std::unique_ptr<ProcessGroup> join(const WorkerEnvironment& env, std::chrono::seconds timeout);
  ~ProcessGroup();

  int rank() const { return rank_; }
  int size() const { return size_; }

  // Sums float32 tensors (any device) over the ranks, in place, as one flat buffer (one all-reduce). A lost worker
  // or a timeout ends in RuntimeFailure with one line.
  void sum(const std::vector<at::Tensor>& tensors);
  // Sums plain numbers over the ranks (a small all-reduce).
  std::vector<double> sum(const std::vector<double>& values);
  // Every rank's rows (a CPU tensor [n, width], float32 or float64; n may be 0, and then any width), concatenated in
  // rank order, and the row where this rank's begin (two all-reduces).
  std::pair<at::Tensor, int64_t> gather_rows(const at::Tensor& rows);
  void barrier();

 private:
  struct Impl;
  ProcessGroup(std::unique_ptr<Impl> impl, int rank, int size);
  void all_reduce(at::Tensor& buffer);  // sum over ranks, in place (CPU tensor)
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
};

}  // namespace loratune
