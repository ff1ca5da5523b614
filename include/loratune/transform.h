// Turning decoded photos into model input, as the bundle's preprocessing says: resize, crop, augment, normalise.
#pragma once

#include <ATen/Tensor.h>

#include <array>

#include "loratune/batch_source.h"
#include "loratune/bundle.h"

namespace cv {
class Mat;
}

namespace loratune {

struct Preprocess {
  int64_t image_size = 224, resize_size = 256;
  int interpolation = 1;  // cv::InterpolationFlags
  std::array<float, 3> mean{}, std{};

  static Preprocess from_bundle(const BundleInfo& info);
};

// Resizes so that the short side is `short_side` (area averaging first when shrinking more than 2x).
cv::Mat resize_short_side(const cv::Mat& rgb, int64_t short_side, int interpolation);

// Eval transform: resize the short side to resize_size, center crop image_size.
cv::Mat eval_transform(const cv::Mat& rgb, const Preprocess& p);

// Training transform: random resized crop to image_size (area fraction and aspect ratio from `augment`) and a random
// horizontal flip, drawn from `rng`; the eval transform when augmentation is off.
cv::Mat train_transform(const cv::Mat& rgb, const Preprocess& p, const AugmentConfig& augment, Rng& rng);

// Writes a [image_size, image_size] RGB image, normalised, into `out` ([3,H,W] float32, contiguous).
void to_normalized_chw(const cv::Mat& rgb, const Preprocess& p, at::Tensor out);

}  // namespace loratune
