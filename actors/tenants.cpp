#include "actors/tenants.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <sstream>

#include "wire/key_gate.hpp"

namespace keel {

namespace {

constexpr size_t min_key_length = 16;

bool key_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) != 0 ||
         std::string_view("._~+/=-").find(c) != std::string_view::npos;
}

caf::expected<uint64_t> count(const std::string& where, const std::string& field,
                              const std::string& value) {
  if (value.empty() || value.size() > 12 || value.find_first_not_of("0123456789") != value.npos)
    return make_error(errc::bad_request,
                      where + ": " + field + " must be a whole number, got '" + value + "'");
  return std::stoull(value);
}

/// One key line (comments already removed, not blank).
caf::expected<api_key> parse_line(const std::string& line, const std::string& where) {
  std::istringstream in(line);
  api_key k;
  in >> k.key;
  if (k.key.size() < min_key_length || !std::all_of(k.key.begin(), k.key.end(), key_char)) {
    // The key itself is not repeated in the message: it may be a real key with a typo.
    return make_error(errc::bad_request, where + ": a key is at least " +
                                             std::to_string(min_key_length) +
                                             " characters of A-Z a-z 0-9 . _ ~ + / = -, got " +
                                             std::to_string(k.key.size()) + " characters");
  }
  std::map<std::string, std::string> fields;
  for (std::string item; in >> item;) {
    auto eq = item.find('=');
    auto name = item.substr(0, eq);
    static const std::vector<std::string> known{"tenant", "class", "rpm", "tpm", "sessions"};
    if (eq == std::string::npos || std::find(known.begin(), known.end(), name) == known.end())
      return make_error(errc::bad_request, where + ": unknown field '" + item +
                                               "' (expected tenant=, class=, rpm=, tpm=, "
                                               "sessions=)");
    if (!fields.emplace(name, item.substr(eq + 1)).second)
      return make_error(errc::bad_request, where + ": " + name + " given twice");
  }
  for (auto name : {"tenant", "class", "rpm", "tpm", "sessions"})
    if (fields.count(name) == 0)
      return make_error(errc::bad_request, where + ": " + name + "= is missing");
  k.tenant = fields["tenant"];
  if (k.tenant.empty() || k.tenant.size() > 64 ||
      !std::all_of(k.tenant.begin(), k.tenant.end(), key_char))
    return make_error(errc::bad_request, where +
                                             ": tenant must be 1 to 64 characters of "
                                             "A-Z a-z 0-9 . _ ~ + / = -, got '" +
                                             k.tenant + "'");
  k.priority_class = fields["class"];
  auto cap = class_priority(k.priority_class);
  if (!cap) return make_error(errc::bad_request, where + ": " + message_of(cap.error()));
  k.max_priority = *cap;
  auto rpm = count(where, "rpm", fields["rpm"]);
  if (!rpm) return std::move(rpm.error());
  auto tpm = count(where, "tpm", fields["tpm"]);
  if (!tpm) return std::move(tpm.error());
  auto sessions = count(where, "sessions", fields["sessions"]);
  if (!sessions) return std::move(sessions.error());
  k.requests_per_minute = *rpm;
  k.tokens_per_minute = *tpm;
  k.max_sessions = *sessions;
  return k;
}

}  // namespace

caf::expected<int32_t> class_priority(std::string_view name) {
  if (name == "batch") return 0;
  if (name == "standard") return 10;
  if (name == "interactive") return 20;
  return make_error(errc::bad_request, "class must be batch, standard or interactive, got '" +
                                           std::string(name) + "'");
}

caf::expected<key_table> key_table::parse(std::string_view text, const std::string& file) {
  key_table out;
  std::istringstream in{std::string(text)};
  int number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    if (auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto where = file + ":" + std::to_string(number);
    auto k = parse_line(line, where);
    if (!k) return std::move(k.error());
    for (auto& other : out.keys_)
      if (other.key == k->key)
        return make_error(errc::bad_request, where + ": the key of tenant " + k->tenant +
                                                 " is already given to tenant " + other.tenant);
    out.keys_.push_back(std::move(*k));
  }
  if (out.keys_.empty())
    return make_error(errc::bad_request, file +
                                             ": no keys (a node with --keys serves only "
                                             "clients that log in with one)");
  return out;
}

caf::expected<key_table> key_table::load(const std::string& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0)
    return make_error(errc::bad_request, "--keys " + file + ": cannot read it");
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    std::ostringstream mode;
    mode << std::oct << (st.st_mode & 0777);
    return make_error(errc::bad_request, "--keys " + file + ": mode " + mode.str() +
                                             " lets its group or others use it; keys are "
                                             "secrets: chmod 600 " +
                                             file);
  }
  std::ifstream in(file);
  if (!in) return make_error(errc::bad_request, "--keys " + file + ": cannot read it");
  std::stringstream text;
  text << in.rdbuf();
  return parse(text.str(), file);
}

const api_key* key_table::find(std::string_view key) const {
  const api_key* found = nullptr;
  for (auto& k : keys_)  // every key, always: no early exit
    if (wire::same_key(key, k.key)) found = &k;
  return found;
}

void tenant_usage::refill(bucket& b, uint64_t per_minute, clock::time_point now) {
  auto cap = static_cast<double>(per_minute);
  if (!b.started) {
    b = bucket{cap, now, true};
    return;
  }
  auto ms = std::chrono::duration<double, std::milli>(now - b.at).count();
  b.level = std::min(cap, b.level + cap * std::max(ms, 0.0) / 60000.0);
  b.at = now;
}

caf::error tenant_usage::refuse(const api_key& k, const char* limit, uint64_t value,
                                const bucket& b, uint64_t per_minute) {
  // Until the bucket holds one again.
  auto missing = 1.0 - b.level;
  auto ms = per_minute > 0 ? missing * 60000.0 / static_cast<double>(per_minute) : 60000.0;
  retry_after_ms_ = static_cast<uint32_t>(std::clamp(std::ceil(ms), 1.0, 60000.0));
  return make_error(errc::overloaded, "tenant " + k.tenant + ": over its limit " + limit + "=" +
                                          std::to_string(value) + " on this node");
}

caf::error tenant_usage::request(const api_key& k, clock::time_point now) {
  auto& b = requests_[k.tenant];
  refill(b, k.requests_per_minute, now);
  if (b.level < 1.0) return refuse(k, "rpm", k.requests_per_minute, b, k.requests_per_minute);
  b.level -= 1.0;
  return {};
}

caf::error tenant_usage::may_generate(const api_key& k, clock::time_point now) {
  auto& b = tokens_[k.tenant];
  refill(b, k.tokens_per_minute, now);
  if (b.level < 1.0) return refuse(k, "tpm", k.tokens_per_minute, b, k.tokens_per_minute);
  return {};
}

void tenant_usage::charge(const api_key& k, uint64_t n, clock::time_point now) {
  auto& b = tokens_[k.tenant];
  refill(b, k.tokens_per_minute, now);
  // Down to one minute's worth below zero: a long reply delays the tenant's next turns.
  b.level = std::max(b.level - static_cast<double>(n), -static_cast<double>(k.tokens_per_minute));
}

}  // namespace keel
