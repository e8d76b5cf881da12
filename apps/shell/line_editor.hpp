#pragma once

// keel-shell's input: on a terminal, line editing, history (kept in ~/.keel_shell_history) and
// tab completion through Debian's libedit; otherwise (a script on stdin, or no libedit) plain
// lines without a prompt.

#include <functional>
#include <string>
#include <vector>

namespace keel::shell {

class line_editor {
 public:
  /// The words that complete `word`, given the line before it.
  using completer =
      std::function<std::vector<std::string>(const std::string& before, const std::string& word)>;

  /// One editor per process (libedit's state is global). `complete` is called while `read`
  /// waits for a line, on the same thread.
  explicit line_editor(completer complete);
  ~line_editor();
  line_editor(const line_editor&) = delete;
  line_editor& operator=(const line_editor&) = delete;

  /// Whether stdin is a terminal: a prompt, editing and completion.
  bool interactive() const { return interactive_; }

  /// The next line; false at the end of input.
  bool read(const std::string& prompt, std::string& line);

 private:
  bool interactive_;
  completer complete_;
  std::string history_file_;
};

}  // namespace keel::shell
