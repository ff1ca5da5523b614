// The rendezvous store of workers on several machines, in place of c10d's TCPStore server: rank 0 serves it on the
// address it is given only (not on every interface), every request is bounded in size, a client that stalls in the
// middle of a request delays no one, and the server stops at once when rank 0 is done. It authenticates no one:
// whoever reaches the port can read and write keys (README, "Several GPUs or machines").
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace loratune {

// Limits of one request, of what the store holds and of its connections (Gloo's values are addresses: a few bytes
// per worker); a client over them is disconnected. Partial requests buffer at most clients x frame, about 130 MiB.
constexpr size_t kMaxStoreKey = 4096;
constexpr size_t kMaxStoreValue = 256 << 10;
constexpr size_t kMaxStoreBytes = 64 << 20;
constexpr size_t kMaxStoreClients = 256;

class RendezvousServer {
 public:
  // Listens on `host`:`port` (the address given, resolved). InputError when the port is in use there.
  RendezvousServer(const std::string& host, int port);
  ~RendezvousServer();
  RendezvousServer(const RendezvousServer&) = delete;
  RendezvousServer& operator=(const RendezvousServer&) = delete;

  // Returns once at most `remaining` clients are connected, or after `limit`.
  void wait_for_clients_to_leave(size_t remaining, std::chrono::milliseconds limit) const;

 private:
  struct Client {
    int fd;
    std::string in;  // bytes of the request being read
  };
  void serve();
  // Handles one complete request; false closes the client (malformed or over a limit).
  bool answer(Client& client, const std::string& request);
  // The answer's payload to `request` into `out`; false when it is malformed or over a limit.
  bool reply(const std::string& request, std::string& out);
  // Sets key to value within kMaxStoreBytes in all; false (nothing changed) beyond it.
  bool store(const std::string& key, const std::string& value);

  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};
  std::vector<Client> clients_;
  std::atomic<size_t> connected_{0};  // clients_.size(), for other threads
  std::map<std::string, std::string> values_;
  size_t stored_bytes_ = 0;
  std::thread thread_;
};

// A worker's connection to the server, as the c10d store Gloo's process group uses.
class RendezvousClient : public c10d::Store {
 public:
  // Connects to `host`:`port`, retrying until `timeout` (rank 0 may start later): RuntimeFailure after it.
  RendezvousClient(const std::string& host, int port, std::chrono::milliseconds timeout);
  ~RendezvousClient() override;

  void set(const std::string& key, const std::vector<uint8_t>& value) override;
  std::vector<uint8_t> compareSet(const std::string& key, const std::vector<uint8_t>& expected,
                                  const std::vector<uint8_t>& desired) override;
  std::vector<uint8_t> get(const std::string& key) override;  // waits for the key, up to the timeout
  int64_t add(const std::string& key, int64_t value) override;
  bool deleteKey(const std::string& key) override;
  bool check(const std::vector<std::string>& keys) override;
  int64_t getNumKeys() override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override;
  // LibTorch 2.6 and later declare it (pure) in c10d::Store; before, it is a method of this class alone.
  virtual c10::intrusive_ptr<c10d::Store> clone();

 private:
  std::string request(const std::string& payload);  // one request and its answer's payload
  std::string host_;
  int port_;
  int fd_ = -1;
  std::mutex mutex_;
};

}  // namespace loratune
