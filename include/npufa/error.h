// Exceptions thrown for bad input. The Python binding maps them to ValueError / TypeError.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace npufa {

// A value, shape or combination of arguments breaks a rule of the op.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// An argument has the wrong dtype or kind.
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <class... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}
}  // namespace detail

// Messages read "<op>: <argument> <rule>, got <value>".
template <class E = ValueError, class... A>
[[noreturn]] void fail(const A&... a) {
  throw E(detail::cat(a...));
}

}  // namespace npufa
