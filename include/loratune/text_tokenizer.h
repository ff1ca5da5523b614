// What a text encoder needs from its tokenizer: prompts in, the token id matrix its forward takes out.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace loratune {

class TextTokenizer {
 public:
  virtual ~TextTokenizer() = default;
  // [N, context] int64 token ids, laid out as the text encoder was trained with (start/end tokens, padding).
  virtual at::Tensor tokenize(const std::vector<std::string>& texts, int64_t context) const = 0;
  virtual int64_t end_token() const = 0;
};

}  // namespace loratune
