#pragma once

// What every libFuzzer target here shares: the seed corpus it writes from code, and the check
// that stops a run at a broken property (docs/wire.md, "Fuzzing").

#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

namespace keel::fuzz {

/// Named seed inputs ("NAME" becomes the file DIR/NAME).
using seeds = std::vector<std::pair<std::string, std::string>>;

/// Called from LLVMFuzzerInitialize: when the command line holds `--write-corpus=DIR` (libFuzzer
/// leaves flags that start with "--" to the target), writes `make()`'s seeds into DIR (created
/// if missing) and exits the process: 0 when written, 1 with the reason on stderr otherwise.
/// Without the flag it does nothing.
template <class Make>
void write_corpus_if_asked(int argc, char** argv, Make make);

/// Writes `s` into `dir`; false (with the reason on stderr) when a file cannot be written.
bool write_seeds(const std::string& dir, const seeds& s);
/// The DIR of `--write-corpus=DIR` in argv, or "" when absent.
std::string corpus_dir_argument(int argc, char** argv);

/// A property of the target did not hold for this input: prints `what` and aborts, which
/// libFuzzer reports as a crash and saves the input (crash-SHA1).
[[noreturn]] void broken(const std::string& what);

template <class Make>
void write_corpus_if_asked(int argc, char** argv, Make make) {
  auto dir = corpus_dir_argument(argc, argv);
  if (dir.empty()) return;
  bool ok = write_seeds(dir, make());
  std::exit(ok ? 0 : 1);
}

}  // namespace keel::fuzz
