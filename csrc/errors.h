// How the C++ backend raises errors: one named Python exception (TypeError, ValueError,
// IndexError or RuntimeError) per failure, its message naming the op and the argument.
//
// Why not TORCH_CHECK_VALUE(cond, op, ": ", name, n, ...) as before: on the H200 (torch 2.11, the
// extension built by g++ 13 and nvcc 13) the two checks that killed the process both streamed an
// integer through c10::str's std::ostringstream, while the three that reached Python intact held
// only strings (ScalarType streams as a string). The crash could not be reproduced without a GPU
// (the same registration pattern built with g++ 12 against torch 2.13 raises correctly), so this
// file removes every ingredient the crashing checks had and the working ones lacked: messages are
// built with std::string appends and std::to_string (no iostreams, and no c10::str template
// instantiated here, where g++- and nvcc-compiled objects would share one weak definition), and
// thrown from one non-inline function, throw_argument_error (registration.cpp), which constructs
// the c10 exception type that torch's Python layer maps to the named Python exception.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

namespace fastcore5 {

enum class ArgError { kType, kValue, kIndex, kRuntime };

// Throws c10::TypeError / ValueError / IndexError / Error (Python TypeError / ValueError /
// IndexError / RuntimeError) carrying ``message``. Defined once, in registration.cpp.
[[noreturn]] void throw_argument_error(ArgError kind, std::string message);

// A message assembled without iostreams.
class Message {
 public:
  Message& operator<<(const char* text) {
    text_ += text;
    return *this;
  }
  Message& operator<<(const std::string& text) {
    text_ += text;
    return *this;
  }
  Message& operator<<(int64_t value) {
    text_ += std::to_string(value);
    return *this;
  }
  Message& operator<<(int value) { return *this << static_cast<int64_t>(value); }
  Message& operator<<(size_t value) {
    text_ += std::to_string(value);
    return *this;
  }
  Message& operator<<(c10::ScalarType dtype) {
    text_ += c10::toString(dtype);
    return *this;
  }
  Message& operator<<(const c10::Device& device) {
    text_ += device.str();
    return *this;
  }
  Message& operator<<(c10::DeviceType type) {
    text_ += c10::DeviceTypeName(type, /*lower_case=*/true);
    return *this;
  }
  Message& operator<<(c10::IntArrayRef values) {
    text_ += '[';
    for (size_t k = 0; k < values.size(); ++k) {
      if (k > 0) text_ += ", ";
      text_ += std::to_string(values[k]);
    }
    text_ += ']';
    return *this;
  }
  std::string take() { return std::move(text_); }

 private:
  std::string text_;
};

template <typename... Parts>
[[noreturn]] void fail(ArgError kind, const Parts&... parts) {
  Message message;
  (message << ... << parts);
  throw_argument_error(kind, message.take());
}

}  // namespace fastcore5
