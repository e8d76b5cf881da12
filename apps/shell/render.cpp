#include "apps/shell/render.hpp"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

namespace keel::shell {

size_t output_width() {
  if (isatty(STDOUT_FILENO) != 1) return std::numeric_limits<size_t>::max();
  winsize ws{};
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 100;
}

std::string fit(const std::string& s, size_t width) {
  if (s.size() <= width) return s;
  if (width <= 3) return s.substr(0, width);
  return s.substr(0, width - 3) + "...";
}

std::string table::render(size_t width) const {
  const size_t n = columns_.size();
  std::vector<size_t> w(n, 0);
  for (size_t c = 0; c < n; ++c) {
    w[c] = columns_[c].header.size();
    for (auto& r : rows_)
      if (c < r.size()) w[c] = std::max(w[c], r[c].size());
  }
  size_t total = 2 * (n > 0 ? n - 1 : 0);
  for (auto x : w) total += x;
  for (size_t c = 0; c < n && total > width; ++c) {
    if (!columns_[c].flexible) continue;
    size_t floor = std::max<size_t>(columns_[c].header.size(), 8);
    size_t cut = std::min(total - width, w[c] > floor ? w[c] - floor : 0);
    w[c] -= cut;
    total -= cut;
  }
  std::string out;
  auto line = [&](const std::vector<std::string>& cells) {
    std::string l;
    for (size_t c = 0; c < n; ++c) {
      auto cell = fit(c < cells.size() ? cells[c] : std::string(), w[c]);
      auto pad = std::string(w[c] - cell.size(), ' ');
      l += columns_[c].right ? pad + cell : cell + (c + 1 < n ? pad : std::string());
      if (c + 1 < n) l += "  ";
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l + "\n";
  };
  std::vector<std::string> headers;
  for (auto& c : columns_) headers.push_back(c.header);
  line(headers);
  for (auto& r : rows_) line(r);
  return out;
}

// -- json -------------------------------------------------------------------------------------

void json::separate() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (!first_.empty()) {
    if (!first_.back()) out_ += ',';
    first_.back() = false;
  }
}

json& json::begin_object() {
  separate();
  out_ += '{';
  first_.push_back(true);
  return *this;
}

json& json::end_object() {
  out_ += '}';
  first_.pop_back();
  return *this;
}

json& json::begin_array() {
  separate();
  out_ += '[';
  first_.push_back(true);
  return *this;
}

json& json::end_array() {
  out_ += ']';
  first_.pop_back();
  return *this;
}

json& json::key(const std::string& k) {
  value(k);
  out_ += ':';
  after_key_ = true;
  return *this;
}

json& json::value(const std::string& s) {
  separate();
  out_ += '"';
  for (unsigned char ch : s) {
    switch (ch) {
      case '"':
        out_ += "\\\"";
        break;
      case '\\':
        out_ += "\\\\";
        break;
      case '\n':
        out_ += "\\n";
        break;
      case '\r':
        out_ += "\\r";
        break;
      case '\t':
        out_ += "\\t";
        break;
      default:
        if (ch < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", ch);
          out_ += buf;
        } else {
          out_ += static_cast<char>(ch);
        }
    }
  }
  out_ += '"';
  return *this;
}

json& json::value(bool b) {
  separate();
  out_ += b ? "true" : "false";
  return *this;
}

json& json::value(int64_t n) {
  separate();
  out_ += std::to_string(n);
  return *this;
}

json& json::value(uint64_t n) {
  separate();
  out_ += std::to_string(n);
  return *this;
}

json& json::value(double x) {
  separate();
  if (!std::isfinite(x)) {
    out_ += "null";
    return *this;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", x);
  out_ += buf;
  return *this;
}

json& json::null() {
  separate();
  out_ += "null";
  return *this;
}

// -- numbers ----------------------------------------------------------------------------------

std::string format_duration_ms(uint64_t ms) {
  char buf[32];
  if (ms < 1000) {
    std::snprintf(buf, sizeof buf, "%llu ms", static_cast<unsigned long long>(ms));
  } else if (ms < 60'000) {
    std::snprintf(buf, sizeof buf, "%.1f s", static_cast<double>(ms) / 1000.0);
  } else {
    auto s = static_cast<unsigned long long>(ms / 1000);
    if (s < 3600)
      std::snprintf(buf, sizeof buf, "%llum %02llus", s / 60, s % 60);
    else if (s < 86400)
      std::snprintf(buf, sizeof buf, "%lluh %02llum", s / 3600, s / 60 % 60);
    else
      std::snprintf(buf, sizeof buf, "%llud %02lluh", s / 86400, s / 3600 % 24);
  }
  return buf;
}

std::string format_age_ms(uint64_t ms, bool never) {
  if (never) return "-";
  return format_duration_ms(ms) + " ago";
}

std::string format_rate(double x) {
  char buf[32];
  if (x >= 1000)
    std::snprintf(buf, sizeof buf, "%.0f", x);
  else
    std::snprintf(buf, sizeof buf, "%.1f", x);
  return buf;
}

std::string format_count(uint64_t n) {
  char buf[32];
  if (n < 100'000)
    std::snprintf(buf, sizeof buf, "%llu", static_cast<unsigned long long>(n));
  else if (n < 100'000'000)
    std::snprintf(buf, sizeof buf, "%.1fk", static_cast<double>(n) / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.1fM", static_cast<double>(n) / 1e6);
  return buf;
}

std::string format_ms(double ms) {
  if (ms <= 0) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f ms", ms);
  return buf;
}

}  // namespace keel::shell
