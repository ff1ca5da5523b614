#include "loratune/image.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cstdlib>
#include <fstream>

#include "data/byte_order.h"

namespace loratune {
namespace {


// Width and height from the header of a PNG, JPEG, BMP, WebP or TIFF file, without decoding; {0, 0} if unknown.
std::pair<uint64_t, uint64_t> header_dimensions(const std::vector<uchar>& b) {
  const size_t n = b.size();
  if (n >= 24 && b[0] == 0x89 && b[1] == 'P' && b[12] == 'I' && b[13] == 'H' && b[14] == 'D' && b[15] == 'R')
    return {read_be32(&b[16]), read_be32(&b[20])};
  if (n >= 4 && b[0] == 0xff && b[1] == 0xd8) {
    for (size_t i = 2; i + 9 < n;) {
      if (b[i] != 0xff) return {0, 0};
      const uchar marker = b[i + 1];
      if (marker == 0xff) {
        ++i;
        continue;
      }
      const bool sof = marker >= 0xc0 && marker <= 0xcf && marker != 0xc4 && marker != 0xc8 && marker != 0xcc;
      if (sof) return {read_be16(&b[i + 7]), read_be16(&b[i + 5])};
      if (marker == 0xd8 || (marker >= 0xd0 && marker <= 0xd7) || marker == 0x01) {
        i += 2;
        continue;
      }
      i += 2 + read_be16(&b[i + 2]);
    }
    return {0, 0};
  }
  if (n >= 26 && b[0] == 'B' && b[1] == 'M') {
    const auto w = static_cast<int32_t>(read_le32(&b[18])), h = static_cast<int32_t>(read_le32(&b[22]));
    return {static_cast<uint64_t>(std::abs(static_cast<int64_t>(w))), static_cast<uint64_t>(std::abs(static_cast<int64_t>(h)))};
  }
  if (n >= 30 && std::equal(b.begin(), b.begin() + 4, "RIFF") && std::equal(b.begin() + 8, b.begin() + 12, "WEBP")) {
    if (std::equal(b.begin() + 12, b.begin() + 16, "VP8 ")) return {read_le16(&b[26]) & 0x3fff, read_le16(&b[28]) & 0x3fff};
    if (std::equal(b.begin() + 12, b.begin() + 16, "VP8L")) {
      const uint32_t bits = read_le32(&b[21]);
      return {(bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1};
    }
    if (std::equal(b.begin() + 12, b.begin() + 16, "VP8X"))
      return {(b[24] | (b[25] << 8) | (b[26] << 16)) + 1u, (b[27] | (b[28] << 8) | (b[29] << 16)) + 1u};
    return {0, 0};
  }
  if (n >= 8 && ((b[0] == 'I' && b[1] == 'I') || (b[0] == 'M' && b[1] == 'M'))) {
    const bool little = b[0] == 'I';
    auto u16 = [&](size_t at) { return little ? read_le16(&b[at]) : read_be16(&b[at]); };
    auto u32 = [&](size_t at) { return little ? read_le32(&b[at]) : read_be32(&b[at]); };
    const size_t ifd = u32(4);
    if (ifd + 2 > n) return {0, 0};
    uint64_t w = 0, h = 0;
    const size_t entries = u16(ifd);
    for (size_t k = 0; k < entries && ifd + 2 + 12 * (k + 1) <= n; ++k) {
      const size_t e = ifd + 2 + 12 * k;
      const uint32_t tag = u16(e), type = u16(e + 2);
      const uint64_t value = type == 3 ? u16(e + 8) : u32(e + 8);
      if (tag == 256) w = value;
      if (tag == 257) h = value;
    }
    return {w, h};
  }
  return {0, 0};
}

}  // namespace

std::optional<cv::Mat> decode_image(const std::filesystem::path& path, std::string& error, int64_t max_pixels) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    error = "cannot open";
    return std::nullopt;
  }
  std::vector<uchar> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.empty()) {
    error = "empty file (0 bytes)";
    return std::nullopt;
  }
  const auto [width, height] = header_dimensions(bytes);
  if (max_pixels > 0 && width > 0 && height > 0 && width * height > static_cast<uint64_t>(max_pixels)) {
    error = std::to_string(width) + "x" + std::to_string(height) + " pixels, over data.max_image_pixels (" +
            std::to_string(max_pixels) + "); shrink it or raise the limit";
    return std::nullopt;
  }
  cv::Mat bgr;
  try {
    // IMREAD_COLOR: 3 channels, 8 bits (greyscale expanded, alpha dropped, 16-bit scaled), EXIF orientation applied.
    bgr = cv::imdecode(bytes, cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {
    error = std::string("cannot decode: ") + e.what();
    return std::nullopt;
  }
  if (bgr.empty() || bgr.cols < 1 || bgr.rows < 1) {
    error = "cannot decode (damaged or unsupported image)";
    return std::nullopt;
  }
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return rgb;
}

}  // namespace loratune
