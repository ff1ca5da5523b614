// Decoding photos: any common format and orientation into 8-bit RGB.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "loratune/batch_source.h"

namespace cv {
class Mat;
}

namespace loratune {

// RGB, 8 bits per channel, EXIF orientation applied; greyscale, RGBA and 16-bit inputs converted.
// Returns an empty optional and sets `error` when the file cannot be decoded or its header says it has more than
// `max_pixels` pixels (0: no limit).
std::optional<cv::Mat> decode_image(const std::filesystem::path& path, std::string& error,
                                    int64_t max_pixels = kDefaultMaxImagePixels);

}  // namespace loratune
