#include "apps/cli.hpp"

#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>

namespace keel::cli {

caf::expected<options> options::parse(std::span<char*> args, std::span<const option> spec,
                                      size_t max_positional) {
  options out;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    if (a.rfind("--", 0) != 0 || a == "--") {
      if (out.positional_.size() >= max_positional) {
        return make_error(errc::bad_request, "unexpected argument '" + a + "' (see --help)");
      }
      out.positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    const option* o = nullptr;
    for (auto& s : spec)
      if (name == s.name) o = &s;
    if (o == nullptr)
      return make_error(errc::bad_request, "unknown option --" + name + " (see --help)");
    if (o->value != nullptr && !inline_value) {
      if (i + 1 >= args.size()) {
        return make_error(errc::bad_request,
                          "option --" + name + " needs a value " + std::string(o->value));
      }
      value = args[++i];
    } else if (o->value == nullptr && inline_value) {
      return make_error(errc::bad_request,
                        "option --" + name + " takes no value, got '" + value + "'");
    }
    out.values_[name] = value;
  }
  return out;
}

std::string options::get(const std::string& name, const std::string& fallback) const {
  auto i = values_.find(name);
  return i == values_.end() ? fallback : i->second;
}

caf::expected<int64_t> options::get_int(const std::string& name, int64_t fallback, int64_t min,
                                        int64_t max) const {
  auto i = values_.find(name);
  if (i == values_.end()) return fallback;
  const char* s = i->second.c_str();
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s, &end, 10);
  if (*s == '\0' || *end != '\0' || errno != 0) {
    return make_error(errc::bad_request, "--" + name + " " + i->second + ": expected an integer");
  }
  if (v < min || v > max) {
    return make_error(errc::bad_request, "--" + name + " " + i->second + ": expected " +
                                             std::to_string(min) + " to " + std::to_string(max));
  }
  return static_cast<int64_t>(v);
}

caf::expected<double> options::get_real(const std::string& name, double fallback, double min,
                                        double max) const {
  auto i = values_.find(name);
  if (i == values_.end()) return fallback;
  const char* s = i->second.c_str();
  char* end = nullptr;
  double v = std::strtod(s, &end);
  if (*s == '\0' || *end != '\0' || !std::isfinite(v)) {
    return make_error(errc::bad_request, "--" + name + " " + i->second + ": expected a number");
  }
  if (v < min || v > max) {
    return make_error(errc::bad_request, "--" + name + " " + i->second + ": expected " +
                                             std::to_string(min) + " to " + std::to_string(max));
  }
  return v;
}

caf::expected<uint64_t> options::get_bytes(const std::string& name, uint64_t fallback) const {
  auto i = values_.find(name);
  if (i == values_.end()) return fallback;
  std::string s = i->second;
  uint64_t mult = 1;
  if (!s.empty()) {
    char u = static_cast<char>(std::toupper(static_cast<unsigned char>(s.back())));
    if (u == 'K' || u == 'M' || u == 'G') {
      mult = u == 'K' ? 1ull << 10 : u == 'M' ? 1ull << 20 : 1ull << 30;
      s.pop_back();
    }
  }
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0 || s[0] == '-' || v > (1ull << 50) / mult) {
    return make_error(errc::bad_request,
                      "--" + name + " " + i->second + ": expected a byte count such as 512M");
  }
  return v * mult;
}

caf::expected<std::string> read_secret_file(const std::string& flag, const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line))
    return make_error(errc::bad_request, "--" + flag + " " + path + ": cannot read it");
  auto b = line.find_first_not_of(" \t\r\n");
  line = b == std::string::npos ? std::string() : line.substr(b, line.find_last_not_of(" \t\r\n") - b + 1);
  if (line.empty())
    return make_error(errc::bad_request, "--" + flag + " " + path + ": its first line is empty");
  return line;
}

std::string readable_by_others(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || (st.st_mode & (S_IRGRP | S_IROTH)) == 0) return {};
  char mode[8];
  std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
  return path + " is readable by other users (mode " + mode + "): chmod go-rwx " + path;
}

caf::error secret_on_command_line(const std::string& flag, const std::string& instead) {
  return make_error(errc::bad_request, "--" + flag +
                                           ": a secret on the command line is visible to every "
                                           "user of this host (ps); " +
                                           instead);
}

void log_line(const char* program, const std::string& line) {
  std::string out = std::string(program) + ": " + line + "\n";
  size_t done = 0;
  while (done < out.size()) {
    auto n = ::write(2, out.data() + done, out.size() - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
}

bool wants_help(std::span<char*> args) {
  for (auto* a : args)
    if (std::string_view(a) == "--help" || std::string_view(a) == "-h") return true;
  return false;
}

int fail(const char* program, const caf::error& err) {
  std::cerr << program << ": " << describe(err) << "\n";
  return code_of(err) == errc::bad_request ? 2 : 1;
}

int dispatch(int argc, char** argv, const char* program, const char* top_help,
             std::span<const command> commands) {
  std::span<char*> args(argv + 1, static_cast<size_t>(argc - 1));
  if (args.empty()) {
    std::cerr << top_help;
    return 2;
  }
  std::string_view name = args[0];
  if (name == "--help" || name == "-h" || name == "help") {
    std::cout << top_help;
    return 0;
  }
  std::string names;
  for (auto& c : commands) {
    if (name == c.name) return c.run(args.subspan(1));
    names += (names.empty() ? "" : ", ") + std::string(c.name);
  }
  std::cerr << program << ": unknown command '" << name << "', expected " << names
            << " (see --help)\n";
  return 2;
}

std::string help_text(const std::string& usage, const std::string& description,
                      std::span<const option> spec) {
  std::string out = "usage: " + usage + "\n\n" + description + "\n\noptions:\n";
  for (auto& o : spec) {
    std::string left = std::string("  --") + o.name;
    if (o.value != nullptr) left += std::string(" ") + o.value;
    if (left.size() < 26)
      left.resize(26, ' ');
    else
      left += "\n" + std::string(26, ' ');
    out += left + o.help + "\n";
  }
  out += "  --help                  show this text\n";
  return out;
}

}  // namespace keel::cli
