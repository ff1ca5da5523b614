#include "distributed/rendezvous_store.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "loratune/errors.h"

namespace loratune {
namespace {

// Requests and answers travel as frames: a 4-byte little-endian length, then that many bytes. A request is one
// operation byte and its fields (strings with a 4-byte length, integers in 8 bytes); an answer is a status byte
// (0: done) and its fields.
enum Op : uint8_t { kSet = 1, kGet, kAdd, kCompareSet, kDelete, kCheck, kNumKeys };
constexpr size_t kMaxFrame = kMaxStoreValue * 2 + kMaxStoreKey + 64;

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_i64(std::string& out, int64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xff));
}
void put_string(std::string& out, const std::string& s) {
  put_u32(out, static_cast<uint32_t>(s.size()));
  out += s;
}
uint32_t frame_size(const std::string& header) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(header[i])) << (8 * i);
  return v;
}
std::string frame(const std::string& payload) {
  std::string out;
  put_u32(out, static_cast<uint32_t>(payload.size()));
  return out + payload;
}

// Reads fields from a frame's payload; every read is bounds-checked (false once anything was missing).
class Reader {
 public:
  explicit Reader(std::string s) : s_(std::move(s)) {}
  bool ok() const { return ok_; }
  bool done() const { return ok_ && at_ == s_.size(); }
  uint32_t u32() {
    if (!need(4)) return 0;
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(s_[at_ + i])) << (8 * i);
    at_ += 4;
    return v;
  }
  int64_t i64() {
    if (!need(8)) return 0;
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(s_[at_ + i])) << (8 * i);
    at_ += 8;
    return static_cast<int64_t>(v);
  }
  uint8_t byte() { return need(1) ? static_cast<uint8_t>(s_[at_++]) : 0; }
  std::string string(size_t limit) {
    const uint32_t n = u32();
    if (n > limit) ok_ = false;
    if (!need(n)) return std::string();
    std::string v = s_.substr(at_, n);
    at_ += n;
    return v;
  }

 private:
  bool need(size_t n) {
    if (!ok_ || s_.size() - at_ < n) ok_ = false;
    return ok_;
  }
  std::string s_;
  size_t at_ = 0;
  bool ok_ = true;
};

addrinfo* resolve(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (rc != 0) throw InputError("MASTER_ADDR " + host + " does not resolve: " + ::gai_strerror(rc));
  return found;
}

using Clock = std::chrono::steady_clock;

// Waits until `fd` is ready for `events` or the deadline passes (false).
bool ready(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    pollfd p{fd, events, 0};
    const int rc = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (rc > 0) return true;
    if (rc < 0 && errno != EINTR) return false;
  }
}

void send_all(int fd, const std::string& bytes, Clock::time_point deadline) {
  size_t sent = 0;
  while (sent < bytes.size()) {
    if (!ready(fd, POLLOUT, deadline)) throw std::runtime_error("the store did not take a request in time");
    const ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno != EINTR && errno != EAGAIN) throw std::runtime_error(std::string("store: ") + std::strerror(errno));
    if (n > 0) sent += static_cast<size_t>(n);
  }
}

std::string receive(int fd, size_t size, Clock::time_point deadline) {
  std::string out(size, '\0');
  size_t got = 0;
  while (got < size) {
    if (!ready(fd, POLLIN, deadline)) throw std::runtime_error("the store did not answer in time");
    const ssize_t n = ::recv(fd, out.data() + got, size - got, 0);
    if (n == 0) throw std::runtime_error("the store closed the connection (rank 0 ended?)");
    if (n < 0 && errno != EINTR && errno != EAGAIN) throw std::runtime_error(std::string("store: ") + std::strerror(errno));
    if (n > 0) got += static_cast<size_t>(n);
  }
  return out;
}

}  // namespace

RendezvousServer::RendezvousServer(const std::string& host, int port) {
  addrinfo* found = resolve(host, port);
  int error = 0;
  for (addrinfo* a = found; a && listen_fd_ < 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 128) == 0) {
      listen_fd_ = fd;
    } else {
      error = errno;
      ::close(fd);
    }
  }
  ::freeaddrinfo(found);
  if (listen_fd_ < 0) {
    const std::string where = host + ":" + std::to_string(port);
    if (error == EADDRINUSE)
      throw InputError("MASTER_PORT " + std::to_string(port) + " is in use on " + host +
                       ": choose another port (MASTER_PORT, or torchrun --master-port)");
    throw InputError("cannot listen on MASTER_ADDR:MASTER_PORT " + where + " (" + std::strerror(error) +
                     "): give rank 0 an address of its own machine");
  }
  if (::pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) {
    ::close(listen_fd_);
    throw RuntimeFailure("cannot start the rendezvous store");
  }
  thread_ = std::thread([this] { serve(); });
}

RendezvousServer::~RendezvousServer() {
  const char stop = 1;
  [[maybe_unused]] const ssize_t n = ::write(wake_[1], &stop, 1);
  thread_.join();  // the loop never blocks on a client: it returns at once
  for (const auto& c : clients_) ::close(c.fd);
  ::close(listen_fd_);
  ::close(wake_[0]);
  ::close(wake_[1]);
}

void RendezvousServer::wait_for_clients_to_leave(size_t remaining, std::chrono::milliseconds limit) const {
  const auto deadline = Clock::now() + limit;
  while (connected_ > remaining && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

void RendezvousServer::serve() {
  std::vector<char> buffer(64 * 1024);
  for (;;) {
    std::vector<pollfd> fds = {{wake_[0], POLLIN, 0}, {listen_fd_, POLLIN, 0}};
    for (const auto& c : clients_) fds.push_back({c.fd, POLLIN, 0});
    if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) return;
    if (fds[0].revents) return;
    std::vector<bool> drop(clients_.size(), false);
    for (size_t i = 0; i < clients_.size(); ++i) {
      if (!fds[i + 2].revents) continue;
      Client& c = clients_[i];
      const ssize_t n = ::recv(c.fd, buffer.data(), buffer.size(), 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        drop[i] = true;
        continue;
      }
      if (n > 0) c.in.append(buffer.data(), static_cast<size_t>(n));
      // Every complete request in the buffer; a length over the limit ends the connection before it is read.
      while (!drop[i] && c.in.size() >= 4) {
        const size_t size = frame_size(c.in);
        if (size == 0 || size > kMaxFrame) drop[i] = true;
        else if (c.in.size() < 4 + size) break;
        else {
          const std::string request = c.in.substr(4, size);
          c.in.erase(0, 4 + size);
          drop[i] = !answer(c, request);
        }
      }
    }
    for (size_t i = clients_.size(); i-- > 0;)
      if (drop[i]) {
        ::close(clients_[i].fd);
        clients_.erase(clients_.begin() + static_cast<std::ptrdiff_t>(i));
      }
    if (fds[1].revents) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd >= 0 && clients_.size() < kMaxStoreClients) clients_.push_back({fd, {}});
      else if (fd >= 0) ::close(fd);
    }
    connected_ = clients_.size();
  }
}

bool RendezvousServer::store(const std::string& key, const std::string& value) {
  const auto it = values_.find(key);
  const size_t old = it == values_.end() ? 0 : key.size() + it->second.size();
  if (stored_bytes_ - old + key.size() + value.size() > kMaxStoreBytes) return false;
  stored_bytes_ = stored_bytes_ - old + key.size() + value.size();
  values_[key] = value;
  return true;
}

bool RendezvousServer::answer(Client& client, const std::string& request) {
  std::string out(1, '\0');
  if (!reply(request, out)) return false;
  // Answers are small but for values; a client that does not read them in time is dropped.
  try {
    send_all(client.fd, frame(out), Clock::now() + std::chrono::seconds(5));
  } catch (const std::exception&) {
    return false;
  }
  return true;
}

bool RendezvousServer::reply(const std::string& request, std::string& out) {
  Reader in(request);
  switch (in.byte()) {
    case kSet: {
      const std::string key = in.string(kMaxStoreKey), value = in.string(kMaxStoreValue);
      if (!in.done() || !store(key, value)) return false;
      break;
    }
    case kGet: {
      const std::string key = in.string(kMaxStoreKey);
      if (!in.done()) return false;
      const auto it = values_.find(key);
      out.push_back(it != values_.end());
      if (it != values_.end()) put_string(out, it->second);
      break;
    }
    case kAdd: {
      const std::string key = in.string(kMaxStoreKey);
      const int64_t delta = in.i64();
      if (!in.done()) return false;
      const auto it = values_.find(key);
      int64_t value = delta;
      if (it != values_.end()) value = static_cast<int64_t>(std::strtoll(it->second.c_str(), nullptr, 10)) + delta;
      if (!store(key, std::to_string(value))) return false;
      put_i64(out, value);
      break;
    }
    case kCompareSet: {
      const std::string key = in.string(kMaxStoreKey), expected = in.string(kMaxStoreValue),
                        desired = in.string(kMaxStoreValue);
      if (!in.done()) return false;
      const auto it = values_.find(key);
      if ((it == values_.end() && expected.empty()) || (it != values_.end() && it->second == expected)) {
        if (!store(key, desired)) return false;
      }
      const auto now = values_.find(key);
      put_string(out, now != values_.end() ? now->second : expected);
      break;
    }
    case kDelete: {
      const std::string key = in.string(kMaxStoreKey);
      if (!in.done()) return false;
      const auto it = values_.find(key);
      out.push_back(it != values_.end());
      if (it != values_.end()) {
        stored_bytes_ -= key.size() + it->second.size();
        values_.erase(it);
      }
      break;
    }
    case kCheck: {
      const uint32_t count = in.u32();  // each key takes at least 4 bytes: the frame bounds the loop
      bool all = true;
      for (uint32_t k = 0; k < count && in.ok(); ++k) all = values_.count(in.string(kMaxStoreKey)) > 0 && all;
      if (!in.done()) return false;
      out.push_back(all);
      break;
    }
    case kNumKeys:
      if (!in.done()) return false;
      put_i64(out, static_cast<int64_t>(values_.size()));
      break;
    default:
      return false;
  }
  return true;
}

RendezvousClient::RendezvousClient(const std::string& host, int port, std::chrono::milliseconds timeout)
    : c10d::Store(timeout), host_(host), port_(port) {
  const auto deadline = Clock::now() + timeout;
  std::string last = "no answer";
  while (fd_ < 0) {
    addrinfo* found = resolve(host, port);
    for (addrinfo* a = found; a && fd_ < 0; a = a->ai_next) {
      const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
        const int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fd_ = fd;
      } else {
        last = std::strerror(errno);
        ::close(fd);
      }
    }
    ::freeaddrinfo(found);
    if (fd_ >= 0) break;
    if (Clock::now() >= deadline) throw std::runtime_error("cannot reach the store at " + host + ":" +
                                                           std::to_string(port) + ": " + last);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

RendezvousClient::~RendezvousClient() {
  if (fd_ >= 0) ::close(fd_);
}

std::string RendezvousClient::request(const std::string& payload) {
  std::lock_guard<std::mutex> guard(mutex_);
  const auto deadline = Clock::now() + timeout_;
  send_all(fd_, frame(payload), deadline);
  const uint32_t size = frame_size(receive(fd_, 4, deadline));
  if (size == 0 || size > kMaxFrame) throw std::runtime_error("the store sent a malformed answer");
  std::string answer = receive(fd_, size, deadline);
  if (answer[0] != 0) throw std::runtime_error("the store refused a request");
  return answer.substr(1);
}

namespace {

std::string op_with_key(Op op, const std::string& key) {
  if (key.size() > kMaxStoreKey) throw std::runtime_error("store key longer than " + std::to_string(kMaxStoreKey));
  std::string p(1, static_cast<char>(op));
  put_string(p, key);
  return p;
}

std::string bytes_to_string(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::vector<uint8_t> string_to_bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

}  // namespace

void RendezvousClient::set(const std::string& key, const std::vector<uint8_t>& value) {
  if (value.size() > kMaxStoreValue) throw std::runtime_error("store value larger than the limit");
  std::string p = op_with_key(kSet, key);
  put_string(p, bytes_to_string(value));
  request(p);
}

std::vector<uint8_t> RendezvousClient::compareSet(const std::string& key, const std::vector<uint8_t>& expected,
                                                  const std::vector<uint8_t>& desired) {
  std::string p = op_with_key(kCompareSet, key);
  put_string(p, bytes_to_string(expected));
  put_string(p, bytes_to_string(desired));
  Reader r(request(p));
  return string_to_bytes(r.string(kMaxStoreValue));
}

std::vector<uint8_t> RendezvousClient::get(const std::string& key) {
  wait({key});
  Reader r(request(op_with_key(kGet, key)));
  if (!r.byte()) throw std::runtime_error("store key " + key + " was deleted while waited for");
  return string_to_bytes(r.string(kMaxStoreValue));
}

int64_t RendezvousClient::add(const std::string& key, int64_t value) {
  std::string p = op_with_key(kAdd, key);
  put_i64(p, value);
  Reader r(request(p));
  return r.i64();
}

bool RendezvousClient::deleteKey(const std::string& key) {
  Reader r(request(op_with_key(kDelete, key)));
  return r.byte() != 0;
}

bool RendezvousClient::check(const std::vector<std::string>& keys) {
  std::string p(1, static_cast<char>(kCheck));
  put_u32(p, static_cast<uint32_t>(keys.size()));
  for (const auto& k : keys) put_string(p, k);
  Reader r(request(p));
  return r.byte() != 0;
}

int64_t RendezvousClient::getNumKeys() {
  Reader r(request(std::string(1, static_cast<char>(kNumKeys))));
  return r.i64();
}

void RendezvousClient::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void RendezvousClient::wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) {
  const auto deadline = Clock::now() + timeout;
  while (!check(keys)) {
    if (timeout != kNoTimeout && Clock::now() >= deadline)
      throw std::runtime_error("timed out after " + std::to_string(timeout.count()) + " ms waiting for store keys");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

c10::intrusive_ptr<c10d::Store> RendezvousClient::clone() {
  return c10::make_intrusive<RendezvousClient>(host_, port_, timeout_);
}

}  // namespace loratune
