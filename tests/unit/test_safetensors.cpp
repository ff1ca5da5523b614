#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "loratune/errors.h"
#include "loratune/safetensors.h"
#include "test_support.h"

namespace loratune {
namespace {

std::string with_header(const std::string& json, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
  return out + json + data;
}

TEST(Safetensors, RoundTripKeepsValuesDtypesAndMetadata) {
  safetensors::Tensors in = {
      {"a.f32", at::randn({3, 5})},
      {"b.f16", at::randn({4}).to(at::kHalf)},
      {"c.bf16", at::randn({2, 2}).to(at::kBFloat16)},
      {"d.i64", at::arange(7, at::kLong)},
      {"e.empty", at::empty({0, 3})},
      {"f.scalar", at::tensor(3.5)},
  };
  const safetensors::Metadata meta = {{"classes", "[\"고양이\", \"dog\"]"}, {"note", "x"}};
  const std::string bytes = safetensors::serialize(in, meta);
  EXPECT_EQ(bytes, safetensors::serialize(in, meta)) << "serialisation is deterministic";
  const uint64_t header_len = *reinterpret_cast<const uint64_t*>(bytes.data());
  EXPECT_EQ(header_len % 8, 0u) << "header padded to 8 bytes";
  const auto out = safetensors::parse(bytes, "mem");
  EXPECT_EQ(out.metadata, meta);
  ASSERT_EQ(out.tensors.size(), in.size());
  for (const auto& [name, t] : in) {
    EXPECT_EQ(out.tensors.at(name).scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(out.tensors.at(name), t)) << name;
  }
}

TEST(Safetensors, FileRoundTripIsAtomic) {
  const auto dir = test::temp_dir("st");
  safetensors::write(dir / "x.safetensors", {{"w", at::ones({2})}});
  EXPECT_TRUE(at::equal(safetensors::read(dir / "x.safetensors").tensors.at("w"), at::ones({2})));
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir), {}), 1) << "no temporary file left behind";
}

TEST(Safetensors, RejectsMalformedFilesClearly) {
  const std::string good = safetensors::serialize({{"w", at::ones({2, 2})}});
  EXPECT_THROW_WITH(safetensors::parse(good.substr(0, 5), "f"), InputError, "shorter than its 8-byte header length");
  EXPECT_THROW_WITH(safetensors::parse(good.substr(0, good.size() - 3), "f"), InputError, "truncated file");
  EXPECT_THROW_WITH(safetensors::parse(with_header("{}", "").replace(0, 8, std::string("\xff\xff\x00\x00\x00\x00\x00\x00", 8)), "f"),
                    InputError, "runs past the end of the");
  EXPECT_THROW_WITH(safetensors::parse(with_header(std::string(8, '\0'), "").replace(0, 8, std::string("\x00\x00\x00\x40\x00\x00\x00\x00", 8)), "f"),
                    InputError, "over the 100 MB limit");
  EXPECT_THROW_WITH(
      safetensors::parse(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                     std::string(12, '\0')), "f"),
      InputError, "overlaps another tensor's data");
  EXPECT_THROW_WITH(safetensors::parse(with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, '\0')), "f"),
                    InputError, "unused bytes before tensor \"a\"");
  EXPECT_THROW_WITH(safetensors::parse(with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", std::string(8, '\0')), "f"),
                    InputError, "4 unused bytes after the last tensor");
  EXPECT_THROW_WITH(safetensors::parse(with_header(R"({"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}})", std::string(4, '\0')), "f"),
                    InputError, "unsupported dtype \"Q4\"");
  EXPECT_THROW_WITH(safetensors::parse(with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,4]}})", std::string(4, '\0')), "f"),
                    InputError, "do not match its shape and dtype");
  EXPECT_THROW_WITH(safetensors::parse(with_header(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", std::string(4, '\0')), "f"),
                    InputError, "non-negative integers");
  EXPECT_THROW_WITH(safetensors::parse(with_header(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}})", std::string(4, '\0')), "f"),
                    InputError, "shape is too large");
  EXPECT_THROW_WITH(safetensors::parse(with_header("{not json", ""), "f"), InputError, "header is not valid JSON");
  EXPECT_THROW_WITH(safetensors::parse(with_header(R"({"__metadata__":{"k":1}})", ""), "f"), InputError,
                    "__metadata__ value of \"k\" is not a string");
}

// Header shape limits: nesting deeper than a header's is refused before parsing, and the tensor count is bounded;
// a header of 100,000 tensors parses in linear time (a parser callback once made that quadratic: minutes).
TEST(Safetensors, HeaderNestingAndTensorCountAreBounded) {
  EXPECT_THROW_WITH(safetensors::parse(with_header(R"({"a": {"b": {"c": [[1]]}}})", ""), "mem"), InputError,
                    "nested too deeply");
  EXPECT_THROW_WITH(safetensors::parse(with_header(std::string(100000, '[') + std::string(100000, ']'), ""), "mem"),
                    InputError, "nested too deeply");
  auto many = [](size_t n) {
    std::string header = "{";
    for (size_t i = 0; i < n; ++i)
      header += (i ? ",\"t" : "\"t") + std::to_string(i) + R"(":{"dtype":"U8","shape":[1],"data_offsets":[)" +
                std::to_string(i) + "," + std::to_string(i + 1) + "]}";
    return with_header(header + "}", std::string(n, '\0'));
  };
  EXPECT_THROW_WITH(safetensors::parse(many(100001), "mem"), InputError, "100001 tensors (limit 100000)");
  EXPECT_EQ(safetensors::parse(many(100000), "mem").tensors.size(), 100000u);
}

}  // namespace
}  // namespace loratune
