// The rendezvous store of multi-machine runs, against what c10d's TCPStore server allowed: it listens on the address
// given only, a client that stalls in the middle of a request delays no one and does not keep the server from
// stopping, and requests over the limits end their connection without being buffered.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "distributed/rendezvous_store.h"
#include "loratune/errors.h"
#include "test_support.h"

namespace loratune {
namespace {

using Clock = std::chrono::steady_clock;

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

// A raw connection to the server, for requests no worker would send.
int raw_client(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  return fd;
}

// Whether the server closed the connection within `seconds` (recv returns 0).
bool closed_by_server(int fd, double seconds) {
  timeval tv{static_cast<time_t>(seconds), 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char byte;
  return ::recv(fd, &byte, 1, 0) == 0;
}

// Local addresses of the listening TCP sockets on `port`, as /proc/net/tcp{,6} show them (hex, as the kernel
// writes them: 0100007F is 127.0.0.1, 00000000 every interface).
std::vector<std::string> listening_on(int port) {
  std::vector<std::string> found;
  char hex_port[8];
  std::snprintf(hex_port, sizeof hex_port, "%04X", port);
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state;
      fields >> slot >> local >> remote >> state;
      const auto colon = local.find(':');
      if (state == "0A" && local.substr(colon + 1) == hex_port) found.push_back(local.substr(0, colon));
    }
  }
  return found;
}

std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }

TEST(RendezvousStore, ServesTheStoreOperationsGlooUses) {
  const int port = free_port();
  RendezvousServer server("127.0.0.1", port);
  RendezvousClient a("127.0.0.1", port, std::chrono::seconds(5)), b("127.0.0.1", port, std::chrono::seconds(5));
  a.set("rank/0", bytes("10.0.0.1:1234"));
  EXPECT_EQ(b.get("rank/0"), bytes("10.0.0.1:1234"));
  EXPECT_EQ(a.add("counter", 2), 2);
  EXPECT_EQ(b.add("counter", 3), 5);
  EXPECT_EQ(a.get("counter"), bytes("5"));  // counters are decimal text, as c10d's stores keep them
  EXPECT_TRUE(a.check({"rank/0", "counter"}));
  EXPECT_FALSE(a.check({"rank/0", "rank/1"}));
  EXPECT_EQ(a.compareSet("cas", {}, bytes("first")), bytes("first"));
  EXPECT_EQ(b.compareSet("cas", bytes("other"), bytes("second")), bytes("first"));
  EXPECT_EQ(a.getNumKeys(), 3);
  EXPECT_TRUE(a.deleteKey("cas"));
  EXPECT_FALSE(a.deleteKey("cas"));
  // get waits for a key that another worker sets later, up to the timeout.
  std::thread later([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    b.set("rank/1", bytes("ready"));
  });
  EXPECT_EQ(a.get("rank/1"), bytes("ready"));
  later.join();
  RendezvousClient quick("127.0.0.1", port, std::chrono::milliseconds(300));
  EXPECT_THROW(quick.get("never"), std::runtime_error);
  EXPECT_EQ(dynamic_cast<RendezvousClient&>(*a.clone()).get("rank/0"), bytes("10.0.0.1:1234"));
}

TEST(RendezvousStore, ListensOnTheAddressGivenOnly) {
  const int port = free_port();
  RendezvousServer server("127.0.0.1", port);
  EXPECT_EQ(listening_on(port), std::vector<std::string>{"0100007F"}) << "c10d's TCPStore listened on every interface";
  EXPECT_THROW_WITH(RendezvousServer("127.0.0.1", port), InputError, "is in use on 127.0.0.1");
}

TEST(RendezvousStore, AStalledClientDelaysNoOneAndTheServerStillStops) {
  const int port = free_port();
  auto server = std::make_unique<RendezvousServer>("127.0.0.1", port);
  const int stalled = raw_client(port);
  const char part[] = {16, 0, 0, 0, 1, 5};  // a SET frame of 16 bytes, 2 of them sent
  ASSERT_EQ(::send(stalled, part, sizeof part, 0), static_cast<ssize_t>(sizeof part));
  RendezvousClient worker("127.0.0.1", port, std::chrono::seconds(5));
  const auto start = Clock::now();
  worker.set("k", bytes("v"));
  EXPECT_EQ(worker.get("k"), bytes("v"));
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 1.0);
  const auto stop = Clock::now();
  server.reset();  // c10d's server joined a thread blocked on the stalled request: rank 0 never exited
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - stop).count(), 1.0);
  ::close(stalled);
}

TEST(RendezvousStore, RequestsOverTheLimitsEndTheirConnection) {
  const int port = free_port();
  RendezvousServer server("127.0.0.1", port);
  // 17 bytes claiming a 1 GiB request: dropped at the header, nothing allocated for it (c10d grew by 550 MB).
  const int claim = raw_client(port);
  const char huge[] = {0, 0, 0, 64, 1, 0, 0, 0, 64, 'k', 'e', 'y', 0, 0, 0, 0, 0};
  ASSERT_EQ(::send(claim, huge, sizeof huge, 0), static_cast<ssize_t>(sizeof huge));
  EXPECT_TRUE(closed_by_server(claim, 5));
  ::close(claim);
  // A well-formed frame whose value is over the limit, and an unknown operation.
  for (const std::string& payload : {std::string("\x01\x01\x00\x00\x00k\xff\xff\xff\x7f", 10), std::string("\x63", 1)}) {
    const int fd = raw_client(port);
    std::string frame(4, '\0');
    for (int i = 0; i < 4; ++i) frame[i] = static_cast<char>((payload.size() >> (8 * i)) & 0xff);
    frame += payload;
    ASSERT_EQ(::send(fd, frame.data(), frame.size(), 0), static_cast<ssize_t>(frame.size()));
    EXPECT_TRUE(closed_by_server(fd, 5));
    ::close(fd);
  }
  // The store keeps serving everyone else.
  RendezvousClient worker("127.0.0.1", port, std::chrono::seconds(5));
  worker.set("still", bytes("here"));
  EXPECT_EQ(worker.get("still"), bytes("here"));
  EXPECT_THROW(worker.set("big", std::vector<uint8_t>(kMaxStoreValue + 1)), std::runtime_error);
}

}  // namespace
}  // namespace loratune
