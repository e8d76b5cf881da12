#include "apps/sd_notify.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>

#include "actors/atoms.hpp"

namespace keel::sd {

namespace {

/// The sockaddr of `address` and its length; `bad_request` when it is neither form.
caf::expected<std::pair<sockaddr_un, socklen_t>> socket_address(const std::string& address) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (address.size() < 2 || (address[0] != '/' && address[0] != '@') ||
      address.size() > sizeof(sa.sun_path) - 1 || address.find('\0') != std::string::npos)
    return make_error(errc::bad_request,
                      "NOTIFY_SOCKET=" + address +
                          ": expected an absolute path of an AF_UNIX socket or '@' and an abstract "
                          "socket name, at most " +
                          std::to_string(sizeof(sa.sun_path) - 1) + " characters");
  std::memcpy(sa.sun_path, address.data(), address.size());
  // An abstract name starts with a NUL byte and has no terminating one: its length counts.
  if (address[0] == '@') sa.sun_path[0] = '\0';
  auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size());
  return std::make_pair(sa, len);
}

}  // namespace

caf::expected<std::optional<notifier>> notifier::from_environment() {
  const char* env = std::getenv("NOTIFY_SOCKET");
  if (env == nullptr || *env == '\0') return std::optional<notifier>{};
  auto n = open(env);
  if (!n) return std::move(n.error());
  return std::optional<notifier>{std::move(*n)};
}

caf::expected<notifier> notifier::open(const std::string& address) {
  if (auto sa = socket_address(address); !sa) return std::move(sa.error());
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return make_error(errc::failed, "NOTIFY_SOCKET=" + address +
                                        ": cannot make a datagram socket: " + std::strerror(errno));
  return notifier(fd, address);
}

notifier::notifier(notifier&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), address_(std::move(other.address_)) {}

notifier& notifier::operator=(notifier&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    address_ = std::move(other.address_);
  }
  return *this;
}

notifier::~notifier() {
  if (fd_ >= 0) ::close(fd_);
}

caf::error notifier::notify(const std::string& state) const {
  auto sa = socket_address(address_);
  if (!sa) return std::move(sa.error());
  ssize_t n;
  do {
    n = ::sendto(fd_, state.data(), state.size(), MSG_NOSIGNAL,
                 reinterpret_cast<const sockaddr*>(&sa->first), sa->second);
  } while (n < 0 && errno == EINTR);
  if (n < 0)
    return make_error(errc::disconnected, "NOTIFY_SOCKET=" + address_ + ": cannot send '" +
                                              state.substr(0, state.find('\n')) +
                                              "': " + std::strerror(errno));
  return {};
}

caf::expected<std::optional<std::chrono::microseconds>> watchdog_period(const char* usec,
                                                                        const char* pid,
                                                                        pid_t self) {
  using result = std::optional<std::chrono::microseconds>;
  if (usec == nullptr || *usec == '\0') return result{};
  auto number = [](const char* name, const char* text) -> caf::expected<unsigned long long> {
    std::string s(text);
    if (s.empty() || s.size() > 19 || s.find_first_not_of("0123456789") != std::string::npos ||
        std::stoull(s) == 0)
      return make_error(errc::bad_request,
                        std::string(name) + "=" + s + ": expected a positive decimal integer");
    return std::stoull(s);
  };
  if (pid != nullptr && *pid != '\0') {
    auto p = number("WATCHDOG_PID", pid);
    if (!p) return std::move(p.error());
    if (*p != static_cast<unsigned long long>(self)) return result{};
  }
  auto u = number("WATCHDOG_USEC", usec);
  if (!u) return std::move(u.error());
  return result{std::chrono::microseconds(std::max<unsigned long long>(*u / 2, 1))};
}

namespace {

struct watchdog_state {
  std::shared_ptr<const notifier> n;
  std::chrono::microseconds period{};
  std::function<std::string()> not_ready;
  std::string last;  // the last not_ready() answer
  static inline const char* name = "watchdog";
};

caf::behavior watchdog(caf::stateful_actor<watchdog_state>* self, std::shared_ptr<const notifier> n,
                       std::chrono::microseconds period, std::function<std::string()> not_ready) {
  auto& st = self->state;
  st.n = std::move(n);
  st.period = period;
  st.not_ready = std::move(not_ready);
  self->send(self, tick_atom::value);
  return {
      [self](tick_atom) {
        auto& s = self->state;
        auto why = s.not_ready ? s.not_ready() : std::string();
        if (why.empty()) {
          if (!s.last.empty()) s.n->notify("STATUS=serving again");
          s.n->notify("WATCHDOG=1");
        } else if (why != s.last) {
          // No ping from now on: systemd's WatchdogSec ends the process and Restart= starts it.
          s.n->notify("STATUS=not ready: " + why + "; watchdog pings stopped");
        }
        s.last = why;
        self->delayed_send(self, s.period, tick_atom::value);
      },
  };
}

}  // namespace

caf::actor spawn_watchdog(caf::actor_system& sys, std::shared_ptr<const notifier> n,
                          std::chrono::microseconds period,
                          std::function<std::string()> not_ready) {
  return sys.spawn(watchdog, std::move(n), period, std::move(not_ready));
}

}  // namespace keel::sd
