#include "apps/shell/line_editor.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>

#ifdef KEEL_HAVE_LIBEDIT
#include <editline/readline.h>
#endif

namespace keel::shell {

#ifdef KEEL_HAVE_LIBEDIT
namespace {

// libedit calls plain C functions: they reach the one editor's completer (not owned) and the
// matches of the word being completed through these.
const line_editor::completer* active_completer = nullptr;
std::vector<std::string> matches;
size_t next_match = 0;
char word_breaks[] = " \t;";

char* next_completion(const char*, int state) {
  if (state == 0) next_match = 0;
  if (next_match >= matches.size()) return nullptr;
  return strdup(matches[next_match++].c_str());
}

char** attempt_completion(const char* text, int start, int) {
  rl_attempted_completion_over = 1;  // never fall back to file names
  if (active_completer == nullptr) return nullptr;
  matches = (*active_completer)(std::string(rl_line_buffer, static_cast<size_t>(start)), text);
  if (matches.empty()) return nullptr;
  return rl_completion_matches(text, next_completion);
}

}  // namespace
#endif

line_editor::line_editor(completer complete)
    : interactive_(isatty(STDIN_FILENO) == 1), complete_(std::move(complete)) {
#ifdef KEEL_HAVE_LIBEDIT
  if (!interactive_) return;
  active_completer = &complete_;
  rl_attempted_completion_function = attempt_completion;
  rl_completer_word_break_characters = word_breaks;
  stifle_history(1000);
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    history_file_ = std::string(home) + "/.keel_shell_history";
    read_history(history_file_.c_str());
  }
#endif
}

line_editor::~line_editor() {
#ifdef KEEL_HAVE_LIBEDIT
  if (!history_file_.empty()) write_history(history_file_.c_str());
  active_completer = nullptr;
#endif
}

bool line_editor::read(const std::string& prompt, std::string& line) {
#ifdef KEEL_HAVE_LIBEDIT
  if (interactive_) {
    char* raw = readline(prompt.c_str());
    if (raw == nullptr) return false;
    line = raw;
    std::free(raw);
    if (line.find_first_not_of(" \t") != std::string::npos) add_history(line.c_str());
    return true;
  }
#endif
  if (interactive_) {
    std::fputs(prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  return static_cast<bool>(std::getline(std::cin, line));
}

}  // namespace keel::shell
