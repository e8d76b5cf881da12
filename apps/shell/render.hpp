#pragma once

// keel-shell's output: aligned text tables that fit a width, and JSON written as it goes.

#include <cstdint>
#include <string>
#include <vector>

namespace keel::shell {

/// The width tables fit by default: the terminal's on a terminal (100 when it does not say),
/// unlimited when stdout is a pipe or a file, so that scripts get whole values (session ids are
/// 34 characters and more, which pushed the last column of `tree` out of 100).
size_t output_width();

/// A text table: a header line and rows, columns separated by two spaces. `render(width)`
/// fits the width by shrinking the one flexible column (its cells are cut with "..."), so the
/// table fits as long as the fixed columns do.
class table {
 public:
  struct column {
    std::string header;
    bool right = false;     // align right (numbers)
    bool flexible = false;  // the column that gives way when the table is too wide
  };

  explicit table(std::vector<column> columns) : columns_(std::move(columns)) {}

  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  bool empty() const { return rows_.empty(); }

  std::string render(size_t width = output_width()) const;

 private:
  std::vector<column> columns_;
  std::vector<std::vector<std::string>> rows_;
};

/// A JSON document written as it goes; commas and quoting are taken care of. One document per
/// command, on one line (JSON lines): `str()` once it is complete.
class json {
 public:
  json& begin_object();
  json& end_object();
  json& begin_array();
  json& end_array();
  /// The key of the next value in an object.
  json& key(const std::string& k);
  json& value(const std::string& s);
  json& value(const char* s) { return value(std::string(s)); }
  json& value(bool b);
  json& value(int64_t n);
  json& value(uint64_t n);
  json& value(int32_t n) { return value(static_cast<int64_t>(n)); }
  json& value(uint32_t n) { return value(static_cast<uint64_t>(n)); }
  json& value(double x);
  json& null();
  /// `key(k).value(v)`.
  template <class T>
  json& field(const std::string& k, const T& v) {
    return key(k).value(v);
  }

  const std::string& str() const { return out_; }

 private:
  void separate();

  std::string out_;
  std::vector<bool> first_;  // per open container: no element written yet
  bool after_key_ = false;
};

/// "850 ms", "12.4 s", "3m 05s", "2h 03m", "4d 01h".
std::string format_duration_ms(uint64_t ms);
/// "3 s ago", "4m 10s ago"; "-" for never.
std::string format_age_ms(uint64_t ms, bool never);
/// A rate with one decimal: "0.0", "12.5", "1234".
std::string format_rate(double x);
/// "1234", "123.4k", "12.3M": at most 6 characters below a billion.
std::string format_count(uint64_t n);
/// "12.5 ms", or "-" for 0.
std::string format_ms(double ms);

/// The text cut to `width` characters, ending in "..." when cut.
std::string fit(const std::string& s, size_t width);

}  // namespace keel::shell
