// Offloading to host memory (`offload: weights / activations`), used by Model: the frozen tensors of each block stay
// in pinned host memory and are copied to the device one block ahead of use; the inputs a checkpointed block keeps
// for backward go to host memory and come back one block ahead. Meant for CUDA, where the copies run on a side
// stream beside the compute; on the CPU the same schedule runs with plain copies (tests use it).
#pragma once

#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/script.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "model/gradient_checkpoint.h"

namespace loratune {

class BlockOffload : public RecomputeHooks {
 public:
  // `weights`: takes the frozen tensors (no requires_grad, non-empty) of each of `blocks` into host memory (pinned for
  // CUDA) and leaves an empty tensor in their place until the block is entered. `first_recomputed`: the first block
  // that backward recomputes (blocks before it never run in backward).
  BlockOffload(std::vector<torch::jit::Module> blocks, const c10::Device& device, bool weights, bool activations,
               int64_t first_recomputed);

  int64_t host_weight_bytes() const { return host_bytes_; }
  int64_t host_parameter_count() const { return host_parameters_; }
  void set_first_recomputed(int64_t block) { first_recomputed_ = block; }

  // Block `i` is about to run: its weights are put in place (waiting for their copy), and those of `next` (-1: none)
  // start copying. Every other block's weights leave the device.
  void enter(int64_t i, int64_t next);
  // Block `i` has run; its device copies are dropped unless `keep` (the last block: backward starts with it).
  void leave(int64_t i, bool keep);

  // RecomputeHooks: backward runs blocks from the last to first_recomputed.
  at::Tensor stash_input(int64_t block, const at::Tensor& input) override;
  at::Tensor restore_input(int64_t block, const at::Tensor& stashed) override;
  void before_recompute(int64_t block) override;
  void after_recompute(int64_t block) override;

  // The most blocks whose weights were on the device at once, since the last reset (tests).
  int64_t peak_resident_blocks() const { return peak_resident_; }
  void reset_peak() { peak_resident_ = resident_count(); }

 private:
  struct Slot {
    torch::jit::Module module;
    std::string name;
    at::Tensor host, placeholder;
  };
  struct Block {
    std::vector<Slot> slots;
    std::vector<at::Tensor> on_device;  // empty while not resident
    std::optional<c10::Event> ready;    // the copy onto the device (CUDA)
  };
  struct Stash {
    at::Tensor host, on_device;
    std::optional<c10::Event> ready;
  };

  void copy_in(Block& b);
  void drop(Block& b);
  void prefetch_input(int64_t block);
  int64_t resident_count() const;
  bool asynchronous() const { return side_.has_value(); }
  void wait(std::optional<c10::Event>& event);  // the compute stream waits for a side-stream copy
  c10::Stream compute_stream() const;

  c10::Device device_;
  bool weights_, activations_;
  int64_t first_recomputed_;
  std::vector<Block> blocks_;
  std::map<int64_t, Stash> stashes_;
  std::optional<c10::Stream> side_;  // copies (CUDA)
  int64_t host_bytes_ = 0, host_parameters_ = 0, peak_resident_ = 0;
};

}  // namespace loratune
